"""One frozen Config for a training run, parsed once in ``main()``.

Precedence, highest first: command-line flags > ``FINETUNE_*`` environment variables >
the YAML file named by ``--config`` > the defaults below. Unknown keys and values of the
wrong type fail at start with one line naming the key and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

ENV_PREFIX = "FINETUNE_"
MODELS = tuple(f"resnet{d}_v{v}" for v in (1, 2) for d in (18, 34, 50, 101, 152))


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices}
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Config:
    # Data and outputs.
    data: str = _opt("", "dataset root written by `prepare` (local path or s3://)")
    output: str = _opt("", "where checkpoints, the exported model and summary.json go")
    synthetic: bool = _opt(False, "train on random in-memory batches; needs no data")
    synthetic_classes: int = _opt(10, "classes of the synthetic dataset")
    synthetic_images: int = _opt(512, "training images per epoch of the synthetic dataset")
    # Model.
    model: str = _opt("resnet18_v2", "Gluon model-zoo ResNet", choices=MODELS)
    pretrained: str = _opt("zoo", "zoo | none | a save_parameters file (path or s3://)")
    head_lr_mult: float = _opt(10.0, "learning-rate multiplier of the new output layer")
    freeze_features: bool = _opt(False, "train only the output layer")
    image_size: int = _opt(224, "network input size (square crops)")
    # Optimisation.
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(32, "images per worker per step")
    lr: float = _opt(0.01, "per-worker base learning rate; scaled by the number of workers")
    momentum: float = _opt(0.9, "SGD momentum")
    wd: float = _opt(1e-4, "weight decay")
    lr_schedule: str = _opt("cosine", "decay after warmup", choices=("cosine", "step"))
    lr_steps: tuple[int, ...] = _opt((30, 60, 90), "epochs at which `step` multiplies the lr")
    lr_decay: float = _opt(0.1, "factor `step` applies at each of lr_steps")
    warmup_epochs: float = _opt(1.0, "epochs of linear warmup from 0 to the scaled lr")
    fp16_allreduce: bool = _opt(False, "compress gradients to float16 for the allreduce")
    # Augmentation (0 disables a jitter).
    flip_prob: float = _opt(0.5, "probability of a horizontal flip")
    brightness: float = _opt(0.4, "brightness jitter")
    contrast: float = _opt(0.4, "contrast jitter")
    saturation: float = _opt(0.4, "saturation jitter")
    hue: float = _opt(0.1, "hue jitter")
    tta: bool = _opt(False, "also evaluate with the mean softmax of five crops")
    # Run control.
    seed: int = _opt(0, "seed of shard order, shuffles and augmentation")
    resume: str = _opt("auto", "resume from the latest checkpoint", choices=("auto", "never"))
    log_interval: int = _opt(20, "steps between progress lines")
    threads: int = _opt(0, "compute threads per worker (0: cores / workers on the node)")
    data_workers: int = _opt(0, "decode and augment threads per worker (0: cores / workers)")
    shuffle_buffer: int = _opt(1024, "records shuffled together while streaming")
    strict_data: bool = _opt(
        False, "fail (not warn) when a shard's sha256 differs from the manifest"
    )
    keep_checkpoints: int = _opt(3, "checkpoints kept in OUTPUT/checkpoints (older ones pruned)")
    log_format: str = _opt("text", "progress lines", choices=("text", "json"))
    # Metrics.
    metrics_port: int = _opt(
        9095, "Prometheus /metrics port of local rank 0 (+ local rank); 0: off"
    )
    metrics_address: str = _opt("0.0.0.0", "address the metrics server binds")
    pushgateway: str = _opt("", "Pushgateway URL that receives the final metrics")
    pushgateway_job: str = _opt("finetune-job", "job label of the pushed group (one per run)")
    metrics_file: str = _opt(
        "", "write the run's Kubeflow Pipelines metrics JSON here at the end (path or s3://)"
    )
    # S3 (credentials come from the standard AWS chain, never from here).
    s3_endpoint_url: str = _opt(
        "", "S3 endpoint (MinIO, Ceph, ...); empty: AWS or AWS_ENDPOINT_URL"
    )
    s3_region: str = _opt("", "S3 region; empty: from the AWS configuration")
    s3_max_attempts: int = _opt(5, "attempts per S3 request (botocore retries)")
    s3_retry_mode: str = _opt(
        "standard", "botocore retry mode", choices=("standard", "adaptive", "legacy")
    )
    s3_connect_timeout: float = _opt(10.0, "seconds to connect to S3")
    s3_read_timeout: float = _opt(60.0, "seconds without bytes before an S3 read fails")

    def __post_init__(self) -> None:
        problems = {
            "output": not self.output,
            "data": not self.data and not self.synthetic,
            "image_size": self.image_size < 16,
            "epochs": self.epochs < 1,
            "batch_size": self.batch_size < 1,
            "lr": self.lr <= 0,
            "head_lr_mult": self.head_lr_mult < 0,
            "warmup_epochs": self.warmup_epochs < 0,
            "flip_prob": not 0 <= self.flip_prob <= 1,
            "log_interval": self.log_interval < 1,
            "synthetic_classes": self.synthetic_classes < 2,
            "synthetic_images": self.synthetic_images < 1,
        }
        problems["metrics_port"] = not 0 <= self.metrics_port <= 65535
        problems["keep_checkpoints"] = self.keep_checkpoints < 1
        problems["s3_max_attempts"] = self.s3_max_attempts < 1
        for key in (
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "threads",
            "data_workers",
            "s3_connect_timeout",
            "s3_read_timeout",
        ):
            problems[key] = getattr(self, key) < 0
        for key, bad in problems.items():
            if bad:
                value = getattr(self, key)
                need = "is required" if value in ("", None) else f"has a bad value {value!r}"
                raise ConfigError(f"config key '{key}' {need}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples as lists), loadable again as a config file."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def coerce(key: str, value: Any, source: str) -> Any:
    """Convert ``value`` to the type of ``key``; strings (flags, env) are parsed."""
    if key not in FIELDS:
        raise ConfigError(f"unknown config key '{key}' in {source}")
    hint = _HINTS[key]
    bad = ConfigError(
        f"config key '{key}' from {source}: expected {_type_name(hint)}, got {value!r}"
    )
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, bool):
                return value
            raise bad
        if typing.get_origin(hint) is tuple:
            inner = typing.get_args(hint)[0]
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise bad
            return tuple(_scalar(inner, item, bad) for item in items if item != "")
        return _scalar(hint, value, bad)
    except (TypeError, ValueError) as e:
        raise bad from e


def _scalar(kind: type, value: Any, bad: ConfigError) -> Any:
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise bad
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise bad
    return kind(value)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__ if isinstance(hint, type) else str(hint)


S3_KEYS = (
    "s3_endpoint_url",
    "s3_region",
    "s3_max_attempts",
    "s3_retry_mode",
    "s3_connect_timeout",
    "s3_read_timeout",
)


def add_arguments(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None) -> None:
    """One flag per Config field (or per one of ``keys``, for commands that take only a few
    and no config file); defaults are suppressed so only given flags count."""
    if keys is None:
        parser.add_argument("--config", metavar="FILE", help="YAML file of config keys")
    for name, f in FIELDS.items():
        if keys is not None and name not in keys:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_default(f)!r})"
        if _HINTS[name] is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=_metavar(name),
                choices=f.metadata["choices"],
                help=help_text,
            )


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default


def _metavar(name: str) -> str:
    hint = _HINTS[name]
    return "A,B,.." if typing.get_origin(hint) is tuple else _type_name(hint).upper()


def flag_values(flags: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``keys`` from parsed flags (added with ``add_arguments(parser, keys)``), typed, with
    Config's defaults for the flags not given."""
    return {
        k: coerce(k, flags[k], "--" + k.replace("_", "-")) if k in flags else FIELDS[k].default
        for k in keys
    }


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Resolve a Config from parsed flags, the environment and the optional YAML file."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_from_yaml(path))
    for var, raw in environ.items():
        if var.startswith(ENV_PREFIX) and var != ENV_PREFIX + "CONFIG":
            key = var[len(ENV_PREFIX) :].lower()
            values[key] = coerce(key, raw, f"environment variable {var}")
    for key, raw in flags.items():
        if key in FIELDS:
            values[key] = coerce(key, raw, "--" + key.replace("_", "-"))
    for key, value in values.items():
        choices = FIELDS[key].metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}"
            )
    return Config(**values)


def _from_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    return {
        key.replace("-", "_"): coerce(key.replace("-", "_"), value, f"config file {path}")
        for key, value in doc.items()
    }
