"""Where a Config's values come from: the command line, ``FINETUNE_*`` environment
variables, a YAML file and mappings (the chart's ``training`` values).

Precedence, highest first: command-line flags > environment variables > the YAML file named
by ``--config`` (or ``FINETUNE_CONFIG``) > Config's defaults. Every value from every source
goes through the same check (``job.config.coerce``, the key's Rule).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from job import rules
from job.config import (
    ENV_PREFIX,
    FIELDS,
    Config,
    ConfigError,
    coerce,
    env_var,
    flag,
    hint,
    rule,
)
from job.rules import HOST, URL

# --- the command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None) -> None:
    """One flag per Config field, in an argument group per Rule.group (or, for commands that
    take only a few keys and no config file, one per key of ``keys``). Defaults are
    suppressed so only given flags count; the help shows the real default instead."""
    if keys is None:
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help=f"YAML file of config keys [{ENV_PREFIX}CONFIG]",
        )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in FIELDS:
        if keys is not None and name not in keys:
            continue
        r = rule(name)
        if r.group not in groups:
            groups[r.group] = parser.add_argument_group(f"{r.group} options")
        _add_flag(groups[r.group], name)


def _add_flag(group: argparse._ArgumentGroup, name: str) -> None:
    common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text(name)}
    if hint(name) is bool:
        group.add_argument(flag(name), action=argparse.BooleanOptionalAction, **common)
    else:
        # No argparse choices/type: Config checks every source alike and says so in one line.
        group.add_argument(flag(name), metavar=_metavar(name), **common)


def help_text(name: str) -> str:
    """The field's help, its choices and bounds, and its default (or 'required') and
    variable."""
    r = rule(name)
    parts = [rules.help_text(r)]
    if r.required:
        parts.append("required unless --synthetic" if name == "data" else "required")
    else:
        parts.append(f"default: {show_default(name)}")
    # argparse formats help with %: a literal percent sign would need doubling.
    return "; ".join(parts).replace("%", "%%") + f" [{env_var(name)}]"


def show_default(name: str) -> str:
    """The default as one would type it: on/off, comma lists, '' for empty strings."""
    value = FIELDS[name].default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value == "":
        return "''"
    return str(value)


def _metavar(name: str) -> str:
    kind, r = hint(name), rule(name)
    if r.choices and len(r.choices) <= 4:
        return "{" + ",".join(r.choices) + "}"
    if typing.get_origin(kind) is tuple:
        return "N,N,..."
    if r.s3_uri:
        return "PATH|S3URI"
    if r.pattern in (URL, HOST):
        return "URL" if r.pattern == URL else "HOST"
    return {int: "N", float: "X", str: "NAME"}.get(kind, "VALUE")


def flag_values(
    flags: Mapping[str, Any], keys: Sequence[str], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``keys`` from parsed flags (added with ``add_arguments(parser, keys)``), else from
    their FINETUNE_* variables, else Config's defaults; typed and checked."""
    environ = os.environ if environ is None else environ
    out = {}
    for k in keys:
        if k in flags:
            out[k] = coerce(k, flags[k], flag(k), text=True)
        elif env_var(k) in environ:
            out[k] = coerce(k, environ[env_var(k)], f"environment variable {env_var(k)}", True)
        else:
            out[k] = FIELDS[k].default
    return out


# --- whole configs ----------------------------------------------------------------------------


def from_mapping(values: Mapping[str, Any], source: str) -> Config:
    """A Config from a mapping of typed values (a YAML file, the chart's ``training``
    values), every key checked and named with ``source`` when it is bad."""
    return Config(**_typed(values, source))


def _typed(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if not isinstance(name, str):
            raise ConfigError(f"config key {key!r} in {source} is not a name")
        out[name] = coerce(name, value, source, text=False)
    return out


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Resolve a Config from parsed flags, the environment and the optional YAML file."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_typed(_from_yaml(path), f"config file {path}"))
    for var, raw in environ.items():
        if var.startswith(ENV_PREFIX) and var != ENV_PREFIX + "CONFIG":
            key = var[len(ENV_PREFIX) :].lower()
            values[key] = coerce(key, raw, f"environment variable {var}", text=True)
    for key, raw in flags.items():
        if key in FIELDS:
            values[key] = coerce(key, raw, flag(key), text=True)
    return Config(**values)


def _from_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    return doc
