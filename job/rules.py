"""What a value must be, and the one check of it: :class:`Rule`.

Config's keys (``job.config``) each carry a Rule, and so do the flags of the commands that
take no config file (prepare, evaluate, predict; submit's options). One check serves them
all, whatever the source (a flag, an environment variable, a YAML file, the chart's values,
a caller in Python), and a value that breaks a rule fails with one line naming where it came
from, the value and the rule. ``job.schema`` turns the rules into JSON Schema: the patterns
below are JSON Schema patterns too (searched, hence anchored).
"""

from __future__ import annotations

import argparse
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Strings that name files or prefixes: no control characters (a newline in a path is always
# a pasting mistake), and an s3:// URI needs a bucket name S3 accepts.
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
S3_URI = r"^s3://[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?(/[^\x00-\x1f\x7f]*)?$"
# Anything that starts like a URI scheme ("S3://", "s3:/", "gs://") must be a valid s3:// URI;
# otherwise it would quietly become a local folder named "S3:".
SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*:"
URL = r"^(https?://[^\s/@]+(/\S*)?)?$"  # empty, or http(s)://host[:port][/path], no user@
REGION = r"^([a-z0-9](-?[a-z0-9])*)?$"  # empty, or like us-east-1 (botocore rejects others)
HOST = r"^[A-Za-z0-9.:_-]+$"  # an IPv4/IPv6 address or a host name
SEED_MAX = 2**32 - 1  # numpy's seed range
EPOCHS_MAX = 100_000
DAY = 86400  # seconds


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass(frozen=True)
class Rule:
    """What a value of one key must be. Floats must always be finite."""

    group: str = ""  # Config's keys: the help section (config.GROUPS)
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # minimum itself is out
    exclusive_maximum: bool = False
    required: bool = False  # must be given: a run has no sensible default
    nonempty: bool = False  # strings: "" is not a value
    pattern: str | None = None  # strings: re.search must match (JSON Schema semantics)
    pattern_help: str = ""  # the pattern in words, for the error line
    s3_uri: bool = False  # strings that start with a scheme (SCHEME) must match S3_URI
    unique: bool = False  # lists: no item twice
    # Where the key shows up besides flags, variables and files:
    chart: bool = False  # a value of the chart's `training` block (values.yaml), with its default
    run: bool = False  # defines the run: part of the fingerprint a resume must match

    def bounds_text(self) -> str:
        """The numeric bounds in words, e.g. '>= 1', '> 0 and <= 1'."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {_num(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {_num(self.maximum)}")
        return " and ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _error(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}" if where else problem)


def type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__ if isinstance(kind, type) else str(kind)


def parse(kind: Any, raw: str, where: str) -> Any:
    """Text (a flag, an environment variable) as a value of ``kind``; unchecked."""
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typing.get_origin(kind) is tuple:
            return [int(item) for item in raw.split(",") if item.strip() != ""]
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError as e:
        raise _error(where, f"expected {type_name(kind)}, got {raw!r}") from e


def typed(kind: Any, r: Rule, value: Any, where: str) -> Any:
    """``value``, which has its type already, as ``kind`` (ints for floats, sorted tuples for
    lists), checked against ``r``."""
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple):
            raise _error(where, f"expected {type_name(kind)}, got {value!r}")
        items = tuple(_scalar(int, item, where, kind) for item in value)
        for item in items:
            check_bounds(r, item, where, what="every item ")
        if r.unique and len(set(items)) != len(items):
            raise _error(where, f"must not name an item twice, got {list(items)}")
        return tuple(sorted(items))  # the schedule's order; as given, any order means the same
    checked = _scalar(kind, value, where, kind)
    check(r, checked, where)
    return checked


def _scalar(kind: type, value: Any, where: str, named: Any) -> Any:
    bad = _error(where, f"expected {type_name(named)}, got {value!r}")
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise bad
        return int(value)
    return float(value)


def check(r: Rule, value: Any, where: str) -> None:
    """``value`` (of the right type) against the rule; ConfigError names ``where``."""
    if (r.pattern == URL or r.s3_uri) and _has_userinfo(value):
        raise _error(
            where,
            "must not hold credentials (user:password@ in the URL; the value is not "
            "repeated here); use pushgateway_username_file/pushgateway_password_file or the "
            "AWS credential chain",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(where, f"must be a finite number, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        check_bounds(r, value, where)
    if not isinstance(value, str):
        return
    if r.choices and value not in r.choices:
        raise _error(where, f"must be one of {', '.join(r.choices)}, got {value!r}")
    if r.nonempty and not value:
        raise _error(where, "must not be empty, got ''")
    if r.pattern and not re.search(r.pattern, value):
        raise _error(where, f"must be {r.pattern_help}, got {value!r}")
    if r.s3_uri and re.search(SCHEME, value) and not re.search(S3_URI, value):
        raise _error(
            where,
            "must be a local path or an s3://BUCKET/KEY URI with a valid bucket name "
            f"(up to 63 of a-z 0-9 . -), got {value!r} (for a local path that holds ':', "
            "start it with ./)",
        )


def _has_userinfo(value: Any) -> bool:
    _, sep, rest = str(value).partition("://")
    return bool(sep) and "@" in rest.split("/", 1)[0]


def check_bounds(r: Rule, value: float, where: str, what: str = "") -> None:
    low_ok = r.minimum is None or (value > r.minimum if r.exclusive_minimum else value >= r.minimum)
    high_ok = r.maximum is None or (
        value < r.maximum if r.exclusive_maximum else value <= r.maximum
    )
    if not (low_ok and high_ok):
        raise _error(where, f"{what}must be {r.bounds_text()}, got {value!r}")


def argument(kind: type, r: Rule) -> Callable[[str], Any]:
    """An argparse ``type``: the flag's text parsed as ``kind`` and checked against ``r``;
    argparse puts the flag's name before the one line."""

    def parse_flag(raw: str) -> Any:
        try:
            return typed(kind, r, parse(kind, raw, ""), "")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    parse_flag.__name__ = kind.__name__  # argparse names the type in its messages
    return parse_flag


def help_text(r: Rule) -> str:
    """The rule's help with its choices and bounds, as a flag's help shows them."""
    parts = [r.help]
    if r.choices:
        parts.append(f"one of: {', '.join(r.choices)}")
    if r.bounds_text():
        parts.append(r.bounds_text())
    return "; ".join(parts)
