"""Values at and beyond every rule of job.config, derived from the fields' Rules.

Used by the CLI/env/YAML battery (tests/job/test_config_rules.py) and the chart's schema
battery (tests/chart/test_chart_schema.py), so both check the same cases.

A case is (key, kind, value): ``value`` is the typed value a YAML file or the chart's values
hold; :func:`as_text` gives what a flag or an environment variable carries.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from job import config as c

KEYS = tuple(c.FIELDS)
# A valid run to change one key of.
BASE = {"data": "ds", "output": "out"}


@dataclass(frozen=True)
class Case:
    key: str
    kind: str  # below-min, above-max, wrong-type, nan, empty, ...
    value: Any
    text: str | None  # as a flag/env value; None: a type text sources cannot carry

    @property
    def id(self) -> str:
        return f"{self.key}-{self.kind}"


def _kind_of(key: str) -> Any:
    return c.hint(key)


def is_list(key: str) -> bool:
    return typing.get_origin(_kind_of(key)) is tuple


def _step(kind: Any) -> float:
    return 1 if kind is int else 0.01


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(as_text(v) for v in value)
    return str(value)


def _wrap(key: str, value: Any) -> Any:
    return [value] if is_list(key) else value


def bound_cases(key: str) -> Iterator[Case]:
    """Just beyond each bound (the bound itself when it is exclusive)."""
    rule, kind = c.rule(key), int if is_list(key) else _kind_of(key)
    if rule.minimum is not None:
        low = rule.minimum if rule.exclusive_minimum else rule.minimum - _step(kind)
        low = kind(low)
        yield Case(key, "below-min", _wrap(key, low), as_text(_wrap(key, low)))
    if rule.maximum is not None:
        high = rule.maximum if rule.exclusive_maximum else rule.maximum + _step(kind)
        high = kind(high)
        yield Case(key, "above-max", _wrap(key, high), as_text(_wrap(key, high)))


def edge_values(key: str) -> Iterator[tuple[str, Any]]:
    """Values on the inclusive bounds (and just inside exclusive ones): accepted."""
    rule, kind = c.rule(key), int if is_list(key) else _kind_of(key)
    if rule.minimum is not None:
        low = rule.minimum + (_step(kind) if rule.exclusive_minimum else 0)
        yield "at-min", _wrap(key, kind(low))
    if rule.maximum is not None:
        high = rule.maximum - (_step(kind) if rule.exclusive_maximum else 0)
        yield "at-max", _wrap(key, kind(high))


def type_cases(key: str) -> Iterator[Case]:
    kind = _kind_of(key)
    if is_list(key):
        yield Case(key, "wrong-type", "30,60", None)  # a string where YAML needs a list
        yield Case(key, "wrong-item-type", [1.5], "1,x")
    elif kind is bool:
        yield Case(key, "wrong-type", "maybe", "maybe")
        yield Case(key, "number-for-bool", 1, None)
    elif kind is int:
        yield Case(key, "wrong-type", "many", "many")
        yield Case(key, "fraction", 2.5, "2.5")
    elif kind is float:
        yield Case(key, "wrong-type", "fast", "fast")
        yield Case(key, "list-for-number", [1], None)
    else:
        yield Case(key, "wrong-type", 5, None)  # text sources can only carry strings


def nonfinite_cases(key: str) -> Iterator[Case]:
    if _kind_of(key) is float:
        for name, value in (("nan", math.nan), ("inf", math.inf), ("minus-inf", -math.inf)):
            yield Case(key, name, value, str(value))


def empty_cases(key: str) -> Iterator[Case]:
    """ "" where the key does not take it."""
    rule, kind = c.rule(key), _kind_of(key)
    if is_list(key):
        yield Case(key, "empty", "", None)  # as text, "" is the empty list: allowed
    elif (
        kind is not str
        or rule.nonempty
        or rule.choices
        or key == "data"
        or (rule.pattern and not _matches(rule.pattern, ""))
    ):
        yield Case(key, "empty", "", "")


def rule_cases(key: str) -> Iterator[Case]:
    """Choices, patterns and list rules."""
    rule = c.rule(key)
    if rule.choices:
        yield Case(key, "not-a-choice", "other", "other")
    if rule.s3_uri:
        for name, uri in (
            ("bucket-uppercase", "s3://Data_Sets/x"),
            ("bucket-space", "s3://my bucket/x"),
            ("no-bucket", "s3:///x"),
            ("newline", "s3://bucket/a\nb"),
        ):
            yield Case(key, name, uri, uri)
        yield Case(key, "control-character", "runs/a\tb", "runs/a\tb")
    elif rule.pattern and rule.pattern != c.NO_CONTROL:
        yield Case(key, "bad-form", "has space", "has space")
    elif rule.pattern == c.NO_CONTROL:
        yield Case(key, "control-character", "a\nb", "a\nb")
    if rule.unique:
        yield Case(key, "repeated-item", [3, 3], "3,3")


def bad_cases(key: str) -> list[Case]:
    return [
        *bound_cases(key),
        *type_cases(key),
        *nonfinite_cases(key),
        *empty_cases(key),
        *rule_cases(key),
    ]


def all_bad_cases() -> list[Case]:
    return [case for key in KEYS for case in bad_cases(key)]


def _matches(pattern: str, value: str) -> bool:
    import re

    return re.search(pattern, value) is not None
