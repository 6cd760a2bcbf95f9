"""One frozen Config for a training run, parsed once in ``main()``.

Every rule a value must follow lives here, in each field's :class:`~job.rules.Rule`: its
type, bounds, choices and pattern, its help, and whether it is a chart value (``chart``) and
defines the run (``run``, the fingerprint). ``job.rules`` checks a value against it, whatever
its source; ``job.sources`` reads the sources (flags > ``FINETUNE_*`` environment variables >
the YAML file named by ``--config`` > the defaults below); ``job.schema`` turns the rules
into the chart's values.yaml block, its schema and the README tables.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from job import rules
from job.rules import DAY, EPOCHS_MAX, HOST, NO_CONTROL, REGION, SEED_MAX, URL, ConfigError, Rule

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


class _Group:
    """Config fields of one help section: ``DATA(default, help, **rule)``, ``DATA.uri(...)``."""

    def __init__(self, name: str) -> None:
        assert name in GROUPS, name
        self.name = name

    def __call__(
        self, default: Any, help: str, choices: tuple[str, ...] | None = None, **rule: Any
    ) -> Any:
        spec = Rule(group=self.name, help=help, choices=choices, **rule)
        return field(default=default, metadata={"help": help, "choices": choices, "rule": spec})

    def uri(self, help: str, default: str = "", **rule: Any) -> Any:
        """A local path or s3:// URI."""
        free = "free of control characters"
        return self(default, help, pattern=NO_CONTROL, pattern_help=free, s3_uri=True, **rule)


DATA, MODEL, OPTIMISATION, AUGMENTATION, RUN_CONTROL, OUTPUTS, METRICS, S3 = map(_Group, GROUPS)


@dataclass(frozen=True)
class Config:
    # Data and outputs.
    data: str = DATA.uri(
        "dataset root written by finetune-job prepare (local path or s3://)",
        required=True,
        chart=True,
    )
    output: str = DATA.uri(
        "where checkpoints, the exported model and summary.json go (local path or s3://)",
        required=True,
        nonempty=True,
        chart=True,
    )
    synthetic: bool = DATA(False, "train on random in-memory batches; needs no data", run=True)
    synthetic_classes: int = DATA(
        10, "classes of the synthetic dataset", minimum=2, maximum=100_000, run=True
    )
    synthetic_images: int = DATA(
        512,
        "training images per epoch of the synthetic dataset",
        minimum=1,
        maximum=10**9,
        run=True,
    )
    # Model.
    model: str = MODEL(
        "resnet18_v2", "Gluon model-zoo ResNet", choices=MODELS, chart=True, run=True
    )
    pretrained: str = MODEL.uri(
        "zoo, none, or a save_parameters file (path or s3://)",
        "zoo",
        nonempty=True,
        run=True,
    )
    head_lr_mult: float = MODEL(
        10.0, "learning-rate multiplier of the new output layer", minimum=0, run=True
    )
    freeze_features: bool = MODEL(False, "train only the output layer", run=True)
    image_size: int = MODEL(
        224,
        "network input size in pixels (square crops)",
        minimum=16,
        maximum=2048,
        run=True,
    )
    # Optimisation.
    epochs: int = OPTIMISATION(10, "training epochs", minimum=1, maximum=EPOCHS_MAX, chart=True)
    batch_size: int = OPTIMISATION(
        32, "images per worker per step", minimum=1, maximum=4096, chart=True, run=True
    )
    lr: float = OPTIMISATION(
        0.01,
        "per-worker base learning rate; scaled by the number of workers",
        minimum=0,
        exclusive_minimum=True,
        chart=True,
        run=True,
    )
    momentum: float = OPTIMISATION(
        0.9, "SGD momentum", minimum=0, maximum=1, exclusive_maximum=True, run=True
    )
    wd: float = OPTIMISATION(1e-4, "weight decay", minimum=0, maximum=1, run=True)
    lr_schedule: str = OPTIMISATION(
        "cosine", "decay after warmup", choices=("cosine", "step"), run=True
    )
    lr_steps: tuple[int, ...] = OPTIMISATION(
        (30, 60, 90),
        "epochs at which the step schedule multiplies the lr by lr_decay (any order, each once)",
        minimum=1,
        maximum=EPOCHS_MAX,
        unique=True,
        run=True,
    )
    lr_decay: float = OPTIMISATION(
        0.1,
        "factor the step schedule applies at each of lr_steps",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        run=True,
    )
    warmup_epochs: float = OPTIMISATION(
        1.0,
        "epochs of linear warmup from 0 to the scaled lr",
        minimum=0,
        maximum=EPOCHS_MAX,
        run=True,
    )
    fp16_allreduce: bool = OPTIMISATION(
        False, "compress gradients to float16 for the allreduce", run=True
    )
    # Augmentation (0 disables a jitter).
    flip_prob: float = AUGMENTATION(
        0.5, "probability of a horizontal flip", minimum=0, maximum=1, run=True
    )
    brightness: float = AUGMENTATION(
        0.4, "brightness jitter (factor in 1 +- x)", minimum=0, maximum=1, run=True
    )
    contrast: float = AUGMENTATION(
        0.4, "contrast jitter (factor in 1 +- x)", minimum=0, maximum=1, run=True
    )
    saturation: float = AUGMENTATION(
        0.4, "saturation jitter (factor in 1 +- x)", minimum=0, maximum=1, run=True
    )
    hue: float = AUGMENTATION(
        0.1, "hue jitter (turns of the hue circle)", minimum=0, maximum=0.5, run=True
    )
    tta: bool = AUGMENTATION(False, "also evaluate with the mean softmax of five crops")
    # Run control.
    seed: int = RUN_CONTROL(
        0,
        "seed of shard order, shuffles and augmentation",
        minimum=0,
        maximum=SEED_MAX,
        run=True,
    )
    resume: str = RUN_CONTROL(
        "auto",
        "resume from the latest checkpoint of this run in OUTPUT (never: start afresh; "
        "force: resume even from another run's checkpoint)",
        choices=("auto", "never", "force"),
    )
    resume_from: str = RUN_CONTROL.uri(
        "output of an earlier, unfinished run of the same definition: resume from its "
        "checkpoint when OUTPUT has none yet (set by scheduled submits)"
    )
    log_interval: int = RUN_CONTROL(20, "steps between progress lines", minimum=1, maximum=10**6)
    threads: int = RUN_CONTROL(
        0,
        "compute threads per worker (0: cores / workers on the node)",
        minimum=0,
        maximum=1024,
    )
    data_workers: int = RUN_CONTROL(
        0,
        "decode and augment threads per worker (0: cores / workers)",
        minimum=0,
        maximum=1024,
    )
    shuffle_buffer: int = RUN_CONTROL(
        1024,
        "records shuffled together while streaming",
        minimum=1,
        maximum=10**7,
        run=True,
    )
    strict_data: bool = RUN_CONTROL(
        False, "fail (not warn) when a shard's sha256 differs from the manifest"
    )
    keep_checkpoints: int = RUN_CONTROL(
        3,
        "checkpoints kept in OUTPUT/checkpoints (older ones pruned)",
        minimum=1,
        maximum=1000,
    )
    checkpoint_interval: float = RUN_CONTROL(
        10.0,
        "minutes of training between checkpoints within an epoch (about the most a hard "
        "failure loses); 0: only at epoch ends and on SIGTERM",
        minimum=0,
        maximum=DAY / 60,
    )
    async_checkpoints: bool = RUN_CONTROL(
        True,
        "write checkpoints on a background thread while training goes on (false: training "
        "waits for every write)",
    )
    log_format: str = RUN_CONTROL("text", "progress lines", choices=("text", "json"))
    step_timeout: float = RUN_CONTROL(
        600.0,
        "seconds without a completed step (training or evaluation batch, checkpoint, start) "
        "after which every rank exits non-zero, naming the phase; 0: off",
        minimum=0,
        maximum=7 * DAY,
    )
    # What the run hands over (OUTPUT/: model, model.onnx, triton/, eval.json, report.html).
    export: str = OUTPUTS(
        "best",
        "epoch to export: best validation top-1 (ties: later) or last",
        choices=("best", "last"),
    )
    onnx: bool = OUTPUTS(True, "also write model.onnx and a Triton model repository")
    onnx_preprocess: bool = OUTPUTS(
        False,
        "also a uint8 RGB NHWC → softmax ONNX/Triton variant for clients sending pixels",
    )
    triton_model_name: str = OUTPUTS(
        "finetune",
        "model name in OUTPUT/triton/",
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        pattern_help="a name of letters, digits, _ and - (not starting with a digit or -)",
    )
    triton_max_batch_size: int = OUTPUTS(
        64, "max_batch_size of the Triton model config", minimum=1, maximum=65536
    )
    eval_worst: int = OUTPUTS(
        16,
        "highest-confidence mistakes listed in eval.json and the report",
        minimum=0,
        maximum=10_000,
    )
    max_class_drop: float = OUTPUTS(
        0.0,
        "promotion gate: largest allowed drop of any class's recall vs latest; 0: off",
        minimum=0,
        maximum=1,
    )
    # Metrics.
    metrics_port: int = METRICS(
        9095,
        "Prometheus /metrics port of local rank 0 (+ local rank); 0: off",
        minimum=0,
        maximum=65535,
        chart=True,
    )
    metrics_address: str = METRICS(
        "0.0.0.0",
        "address the metrics server binds",
        pattern=HOST,
        pattern_help="an IP address or host name",
    )
    pushgateway: str = METRICS(
        "",
        "Pushgateway URL that receives the final metrics (no user:password@ in it: use the "
        "credential files); empty: no push",
        pattern=URL,
        pattern_help="empty or an http(s):// URL",
    )
    pushgateway_username_file: str = METRICS(
        "",
        "file holding the Pushgateway basic-auth user name (a mounted Secret)",
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    pushgateway_password_file: str = METRICS(
        "",
        "file holding the Pushgateway basic-auth password (a mounted Secret)",
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    pushgateway_job: str = METRICS(
        "finetune-job",
        "job label of the pushed group (one per run)",
        nonempty=True,
        pattern=NO_CONTROL,
        pattern_help="free of control characters",
    )
    metrics_file: str = METRICS.uri(
        "write the run's Kubeflow Pipelines metrics JSON here at the end (path or s3://)"
    )
    # S3 (credentials come from the standard AWS chain, never from here).
    s3_endpoint_url: str = S3(
        "",
        "S3 endpoint (MinIO, Ceph, ...); empty: AWS or AWS_ENDPOINT_URL",
        pattern=URL,
        pattern_help="empty or an http(s):// URL",
    )
    s3_region: str = S3(
        "",
        "S3 region; empty: from the AWS configuration",
        pattern=REGION,
        pattern_help="empty or a region name like us-east-1",
    )
    s3_max_attempts: int = S3(
        5, "attempts per S3 request (botocore retries)", minimum=1, maximum=100
    )
    s3_retry_mode: str = S3(
        "standard", "botocore retry mode", choices=("standard", "adaptive", "legacy")
    )
    s3_connect_timeout: float = S3(
        10.0, "seconds to connect to S3", minimum=0, exclusive_minimum=True, maximum=DAY
    )
    s3_read_timeout: float = S3(
        60.0,
        "seconds without bytes before an S3 read fails",
        minimum=0,
        exclusive_minimum=True,
        maximum=DAY,
    )

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError(f"config key 'output' is required ({_given_as('output')})")
        # The same checks as for flags and files, so a Config built in code obeys them too.
        for name in FIELDS:
            value = rules.typed(
                hint(name), rule(name), getattr(self, name), where(name, "the config")
            )
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
_HINTS = typing.get_type_hints(Config)


def rule(key: str) -> Rule:
    return typing.cast(Rule, FIELDS[key].metadata["rule"])


def hint(key: str) -> Any:
    """The Python type of ``key``: bool, int, float, str or tuple[int, ...]."""
    return _HINTS[key]


# Keys that hold a URL or URI: credentials in them would be copied into every log line,
# checkpoint and summary that records the config, so they are refused, and never echoed.
URL_KEYS = tuple(k for k in FIELDS if rule(k).pattern == URL or rule(k).s3_uri)
S3_KEYS = tuple(k for k in FIELDS if rule(k).group == "S3")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_var(key: str) -> str:
    return ENV_PREFIX + key.upper()


def where(key: str, source: str) -> str:
    return f"config key '{key}' from {source}"


def _given_as(key: str) -> str:
    return f"{flag(key)}, {env_var(key)} or the config file"


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
    at = where(key, source)
    parsed = rules.parse(hint(key), value, at) if text and isinstance(value, str) else value
    return rules.typed(hint(key), rule(key), parsed, at)


def check_uri(name: str, value: str) -> str:
    """A path or s3:// URI given outside Config (prepare's DEST, evaluate's --data): the
    data key's rule, reported under ``name``."""
    rules.check(rule("data"), value, name)
    return value
