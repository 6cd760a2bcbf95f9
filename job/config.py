"""One frozen Config for a training run, parsed once in ``main()``.

Precedence, highest first: command-line flags > ``FINETUNE_*`` environment variables >
the YAML file named by ``--config`` (or ``FINETUNE_CONFIG``) > the defaults below.

Every rule a value must follow lives here, in each field's :class:`Rule`: its type, bounds,
choices and pattern. The same check serves flags, environment variables, YAML files and the
chart's values (:func:`from_mapping`), and ``job.schema`` turns the rules into the chart's
values.schema.json. A value that breaks a rule fails at start with one line naming the key,
where it came from, the value and the rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

ENV_PREFIX = "FINETUNE_"
MODELS = tuple(f"resnet{d}_v{v}" for v in (1, 2) for d in (18, 34, 50, 101, 152))
GROUPS = (
    "data",
    "model",
    "optimisation",
    "augmentation",
    "run control",
    "outputs",
    "metrics",
    "S3",
)

# Strings that name files or prefixes: no control characters (a newline in a path is always
# a pasting mistake), and an s3:// URI needs a bucket name S3 accepts. The patterns are
# JSON Schema patterns too (searched, hence anchored), so the chart checks the same.
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

    group: str
    help: str
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


def _opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    *,
    group: str,
    **rule: Any,
) -> Any:
    """A Config field: its default and its Rule (``group``, bounds, pattern, ...)."""
    assert group in GROUPS, group
    spec = Rule(group=group, help=help, choices=choices, **rule)
    return field(default=default, metadata={"help": help, "choices": choices, "rule": spec})


def _uri(help: str, default: str = "", **rule: Any) -> Any:
    return _opt(
        default,
        help,
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
        s3_uri=True,
        **rule,
    )


@dataclass(frozen=True)
class Config:
    # Data and outputs.
    data: str = _uri(
        "dataset root written by finetune-job prepare (local path or s3://)",
        group="data",
        required=True,
        chart=True,
    )
    output: str = _uri(
        "where checkpoints, the exported model and summary.json go (local path or s3://)",
        group="data",
        required=True,
        nonempty=True,
        chart=True,
    )
    synthetic: bool = _opt(
        False, "train on random in-memory batches; needs no data", group="data", run=True
    )
    synthetic_classes: int = _opt(
        10,
        "classes of the synthetic dataset",
        group="data",
        minimum=2,
        maximum=100_000,
        run=True,
    )
    synthetic_images: int = _opt(
        512,
        "training images per epoch of the synthetic dataset",
        group="data",
        minimum=1,
        maximum=10**9,
        run=True,
    )
    # Model.
    model: str = _opt(
        "resnet18_v2", "Gluon model-zoo ResNet", choices=MODELS, group="model", chart=True, run=True
    )
    pretrained: str = _uri(
        "zoo, none, or a save_parameters file (path or s3://)",
        "zoo",
        group="model",
        nonempty=True,
        run=True,
    )
    head_lr_mult: float = _opt(
        10.0,
        "learning-rate multiplier of the new output layer",
        group="model",
        minimum=0,
        run=True,
    )
    freeze_features: bool = _opt(False, "train only the output layer", group="model", run=True)
    image_size: int = _opt(
        224,
        "network input size in pixels (square crops)",
        group="model",
        minimum=16,
        maximum=2048,
        run=True,
    )
    # Optimisation.
    epochs: int = _opt(
        10, "training epochs", group="optimisation", minimum=1, maximum=EPOCHS_MAX, chart=True
    )
    batch_size: int = _opt(
        32,
        "images per worker per step",
        group="optimisation",
        minimum=1,
        maximum=4096,
        chart=True,
        run=True,
    )
    lr: float = _opt(
        0.01,
        "per-worker base learning rate; scaled by the number of workers",
        group="optimisation",
        minimum=0,
        exclusive_minimum=True,
        chart=True,
        run=True,
    )
    momentum: float = _opt(
        0.9,
        "SGD momentum",
        group="optimisation",
        minimum=0,
        maximum=1,
        exclusive_maximum=True,
        run=True,
    )
    wd: float = _opt(1e-4, "weight decay", group="optimisation", minimum=0, maximum=1, run=True)
    lr_schedule: str = _opt(
        "cosine",
        "decay after warmup",
        choices=("cosine", "step"),
        group="optimisation",
        run=True,
    )
    lr_steps: tuple[int, ...] = _opt(
        (30, 60, 90),
        "epochs at which the step schedule multiplies the lr by lr_decay (any order, each once)",
        group="optimisation",
        minimum=1,
        maximum=EPOCHS_MAX,
        unique=True,
        run=True,
    )
    lr_decay: float = _opt(
        0.1,
        "factor the step schedule applies at each of lr_steps",
        group="optimisation",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        run=True,
    )
    warmup_epochs: float = _opt(
        1.0,
        "epochs of linear warmup from 0 to the scaled lr",
        group="optimisation",
        minimum=0,
        maximum=EPOCHS_MAX,
        run=True,
    )
    fp16_allreduce: bool = _opt(
        False,
        "compress gradients to float16 for the allreduce",
        group="optimisation",
        run=True,
    )
    # Augmentation (0 disables a jitter).
    flip_prob: float = _opt(
        0.5,
        "probability of a horizontal flip",
        group="augmentation",
        minimum=0,
        maximum=1,
        run=True,
    )
    brightness: float = _opt(
        0.4,
        "brightness jitter (factor in 1 +- x)",
        group="augmentation",
        minimum=0,
        maximum=1,
        run=True,
    )
    contrast: float = _opt(
        0.4,
        "contrast jitter (factor in 1 +- x)",
        group="augmentation",
        minimum=0,
        maximum=1,
        run=True,
    )
    saturation: float = _opt(
        0.4,
        "saturation jitter (factor in 1 +- x)",
        group="augmentation",
        minimum=0,
        maximum=1,
        run=True,
    )
    hue: float = _opt(
        0.1,
        "hue jitter (turns of the hue circle)",
        group="augmentation",
        minimum=0,
        maximum=0.5,
        run=True,
    )
    tta: bool = _opt(
        False, "also evaluate with the mean softmax of five crops", group="augmentation"
    )
    # Run control.
    seed: int = _opt(
        0,
        "seed of shard order, shuffles and augmentation",
        group="run control",
        minimum=0,
        maximum=SEED_MAX,
        run=True,
    )
    resume: str = _opt(
        "auto",
        "resume from the latest checkpoint of this run in OUTPUT (never: start afresh; "
        "force: resume even from another run's checkpoint)",
        choices=("auto", "never", "force"),
        group="run control",
    )
    resume_from: str = _uri(
        "output of an earlier, unfinished run of the same definition: resume from its "
        "checkpoint when OUTPUT has none yet (set by scheduled submits)",
        group="run control",
    )
    log_interval: int = _opt(
        20, "steps between progress lines", group="run control", minimum=1, maximum=10**6
    )
    threads: int = _opt(
        0,
        "compute threads per worker (0: cores / workers on the node)",
        group="run control",
        minimum=0,
        maximum=1024,
    )
    data_workers: int = _opt(
        0,
        "decode and augment threads per worker (0: cores / workers)",
        group="run control",
        minimum=0,
        maximum=1024,
    )
    shuffle_buffer: int = _opt(
        1024,
        "records shuffled together while streaming",
        group="run control",
        minimum=1,
        maximum=10**7,
        run=True,
    )
    strict_data: bool = _opt(
        False,
        "fail (not warn) when a shard's sha256 differs from the manifest",
        group="run control",
    )
    keep_checkpoints: int = _opt(
        3,
        "checkpoints kept in OUTPUT/checkpoints (older ones pruned)",
        group="run control",
        minimum=1,
        maximum=1000,
    )
    log_format: str = _opt("text", "progress lines", choices=("text", "json"), group="run control")
    step_timeout: float = _opt(
        600.0,
        "seconds without a completed step (training or evaluation batch, checkpoint, start) "
        "after which every rank exits non-zero, naming the phase; 0: off",
        group="run control",
        minimum=0,
        maximum=7 * DAY,
    )
    # What the run hands over (OUTPUT/: model, model.onnx, triton/, eval.json, report.html).
    export: str = _opt(
        "best",
        "epoch to export: best validation top-1 (ties: later) or last",
        choices=("best", "last"),
        group="outputs",
    )
    onnx: bool = _opt(True, "also write model.onnx and a Triton model repository", group="outputs")
    onnx_preprocess: bool = _opt(
        False,
        "also a uint8 RGB NHWC → softmax ONNX/Triton variant for clients sending pixels",
        group="outputs",
    )
    triton_model_name: str = _opt(
        "finetune",
        "model name in OUTPUT/triton/",
        group="outputs",
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        pattern_help="a name of letters, digits, _ and - (not starting with a digit or -)",
    )
    triton_max_batch_size: int = _opt(
        64, "max_batch_size of the Triton model config", group="outputs", minimum=1, maximum=65536
    )
    eval_worst: int = _opt(
        16,
        "highest-confidence mistakes listed in eval.json and the report",
        group="outputs",
        minimum=0,
        maximum=10_000,
    )
    max_class_drop: float = _opt(
        0.0,
        "promotion gate: largest allowed drop of any class's recall vs latest; 0: off",
        group="outputs",
        minimum=0,
        maximum=1,
    )
    # Metrics.
    metrics_port: int = _opt(
        9095,
        "Prometheus /metrics port of local rank 0 (+ local rank); 0: off",
        group="metrics",
        minimum=0,
        maximum=65535,
        chart=True,
    )
    metrics_address: str = _opt(
        "0.0.0.0",
        "address the metrics server binds",
        group="metrics",
        pattern=HOST,
        pattern_help="an IP address or host name",
    )
    pushgateway: str = _opt(
        "",
        "Pushgateway URL that receives the final metrics (no user:password@ in it: use the "
        "credential files); empty: no push",
        group="metrics",
        pattern=URL,
        pattern_help="empty or an http(s):// URL",
    )
    pushgateway_username_file: str = _opt(
        "",
        "file holding the Pushgateway basic-auth user name (a mounted Secret)",
        group="metrics",
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    pushgateway_password_file: str = _opt(
        "",
        "file holding the Pushgateway basic-auth password (a mounted Secret)",
        group="metrics",
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    pushgateway_job: str = _opt(
        "finetune-job",
        "job label of the pushed group (one per run)",
        group="metrics",
        nonempty=True,
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    metrics_file: str = _uri(
        "write the run's Kubeflow Pipelines metrics JSON here at the end (path or s3://)",
        group="metrics",
    )
    # S3 (credentials come from the standard AWS chain, never from here).
    s3_endpoint_url: str = _opt(
        "",
        "S3 endpoint (MinIO, Ceph, ...); empty: AWS or AWS_ENDPOINT_URL",
        group="S3",
        pattern=URL,
        pattern_help="empty or an http(s):// URL",
    )
    s3_region: str = _opt(
        "",
        "S3 region; empty: from the AWS configuration",
        group="S3",
        pattern=REGION,
        pattern_help="empty or a region name like us-east-1",
    )
    s3_max_attempts: int = _opt(
        5, "attempts per S3 request (botocore retries)", group="S3", minimum=1, maximum=100
    )
    s3_retry_mode: str = _opt(
        "standard",
        "botocore retry mode",
        choices=("standard", "adaptive", "legacy"),
        group="S3",
    )
    s3_connect_timeout: float = _opt(
        10.0,
        "seconds to connect to S3",
        group="S3",
        minimum=0,
        exclusive_minimum=True,
        maximum=DAY,
    )
    s3_read_timeout: float = _opt(
        60.0,
        "seconds without bytes before an S3 read fails",
        group="S3",
        minimum=0,
        exclusive_minimum=True,
        maximum=DAY,
    )

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError(f"config key 'output' is required ({_given_as('output')})")
        # The same checks as for flags and files, so a Config built in code obeys them too.
        for name in FIELDS:
            value = _native(name, getattr(self, name), "the config")
            object.__setattr__(self, name, value)  # ints for floats, tuples for lists
        if not self.data and not self.synthetic:
            raise ConfigError(
                f"config key 'data' is required ({_given_as('data')}) unless synthetic is true"
            )
        if bool(self.pushgateway_username_file) != bool(self.pushgateway_password_file):
            raise ConfigError(
                "config keys 'pushgateway_username_file' and 'pushgateway_password_file' "
                "go together: give both or neither"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples as lists), loadable again as a config file."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}


# Keys that hold a URL or URI: credentials in them would be copied into every log line,
# checkpoint and summary that records the config, so they are refused, and never echoed.
URL_KEYS = tuple(
    k for k, f in FIELDS.items() if f.metadata["rule"].pattern == URL or f.metadata["rule"].s3_uri
)
_HINTS = typing.get_type_hints(Config)


def rule(key: str) -> Rule:
    return typing.cast(Rule, FIELDS[key].metadata["rule"])


def hint(key: str) -> Any:
    """The Python type of ``key``: bool, int, float, str or tuple[int, ...]."""
    return _HINTS[key]


def _given_as(key: str) -> str:
    return f"{flag(key)}, {env_var(key)} or the config file"


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_var(key: str) -> str:
    return ENV_PREFIX + key.upper()


# --- one value: parse (text sources), type-check, rule-check ----------------------------------


def coerce(key: str, value: Any, source: str, text: bool | None = None) -> Any:
    """``value`` as the type of ``key``, checked against its Rule.

    ``text``: the value came from a command line or an environment variable, so strings are
    parsed (``"3"``, ``"true"``, ``"30,60"``). Values from YAML files and mappings must have
    their type already, as the chart's schema requires. By default a str is parsed only when
    the key is not a string key.
    """
    if key not in FIELDS:
        raise ConfigError(f"unknown config key '{key}' in {source}")
    if text is None:
        text = isinstance(value, str)
    parsed = _parse(key, value, source) if text and isinstance(value, str) else value
    return _native(key, parsed, source)


def _bad_type(key: str, value: Any, source: str) -> ConfigError:
    return ConfigError(
        f"config key '{key}' from {source}: expected {_type_name(hint(key))}, got {value!r}"
    )


def _parse(key: str, raw: str, source: str) -> Any:
    kind = hint(key)
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
        raise _bad_type(key, raw, source) from e


def _native(key: str, value: Any, source: str) -> Any:
    """Type-check a value that has its type already; then its Rule."""
    kind = hint(key)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple):
            raise _bad_type(key, value, source)
        items = tuple(_scalar(key, int, item, source) for item in value)
        for item in items:
            _check_bounds(key, item, source, what="every item ")
        if rule(key).unique and len(set(items)) != len(items):
            raise ConfigError(
                f"config key '{key}' from {source}: must not name an item twice, got {list(items)}"
            )
        return tuple(sorted(items))  # the schedule's order; as given, any order means the same
    checked = _scalar(key, kind, value, source)
    _check_rule(key, checked, source)
    return checked


def _scalar(key: str, kind: type, value: Any, source: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise _bad_type(key, value, source)
        return value
    if kind is str:
        if not isinstance(value, str):
            raise _bad_type(key, value, source)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_type(key, value, source)
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _bad_type(key, value, source)
        return int(value)
    return float(value)


def _check_rule(key: str, value: Any, source: str) -> None:
    r = rule(key)
    where = f"config key '{key}' from {source}"
    if key in URL_KEYS and _has_userinfo(value):
        raise ConfigError(
            f"{where}: must not hold credentials (user:password@ in the URL; the value is not "
            "repeated here); use pushgateway_username_file/pushgateway_password_file or the "
            "AWS credential chain"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_bounds(key, value, source)
    if not isinstance(value, str):
        return
    if r.choices and value not in r.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(r.choices)}, got {value!r}")
    if r.nonempty and not value:
        raise ConfigError(f"{where}: must not be empty, got ''")
    if r.pattern and not re.search(r.pattern, value):
        raise ConfigError(f"{where}: must be {r.pattern_help}, got {value!r}")
    if r.s3_uri and re.search(SCHEME, value) and not re.search(S3_URI, value):
        raise ConfigError(
            f"{where}: must be a local path or an s3://BUCKET/KEY URI with a valid bucket name "
            f"(up to 63 of a-z 0-9 . -), got {value!r} (for a local path that holds ':', "
            "start it with ./)"
        )


def _has_userinfo(value: Any) -> bool:
    _, sep, rest = str(value).partition("://")
    return bool(sep) and "@" in rest.split("/", 1)[0]


def _check_bounds(key: str, value: float, source: str, what: str = "") -> None:
    r = rule(key)
    low_ok = r.minimum is None or (value > r.minimum if r.exclusive_minimum else value >= r.minimum)
    high_ok = r.maximum is None or (
        value < r.maximum if r.exclusive_maximum else value <= r.maximum
    )
    if not (low_ok and high_ok):
        raise ConfigError(
            f"config key '{key}' from {source}: {what}must be {r.bounds_text()}, got {value!r}"
        )


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__ if isinstance(kind, type) else str(kind)


def check_uri(name: str, value: str) -> str:
    """A path or s3:// URI given outside Config (prepare's DEST, evaluate's --data): the
    data key's rule, reported under ``name``."""
    try:
        _check_rule("data", value, name)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config key 'data' from ", "")) from e
    return value


# --- the command line -------------------------------------------------------------------------

S3_KEYS = tuple(name for name in FIELDS if rule(name).group == "S3")


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
    """The field's help, its choices, and its default (or 'required') and variable."""
    r = rule(name)
    parts = [r.help]
    if r.choices:
        parts.append(f"one of: {', '.join(r.choices)}")
    if r.bounds_text():
        parts.append(r.bounds_text())
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
    kind = hint(name)
    if rule(name).choices and len(rule(name).choices or ()) <= 4:
        return "{" + ",".join(rule(name).choices or ()) + "}"
    if typing.get_origin(kind) is tuple:
        return "N,N,..."
    if rule(name).s3_uri:
        return "PATH|S3URI"
    if rule(name).pattern in (URL, HOST):
        return "URL" if rule(name).pattern == URL else "HOST"
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
