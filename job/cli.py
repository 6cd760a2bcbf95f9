"""finetune-job: fine-tune a pretrained ResNet with Horovod, on data streamed from S3.

Runbook (the same lines the Helm chart renders for the MPI Operator's launcher)::

    # one process, no launcher
    finetune-job train --data s3://bucket/ds --output s3://bucket/runs/r1

    # 2 workers on this machine
    horovodrun -np 2 -H localhost:2 finetune-job train --data DIR --output OUT \\
        --pretrained OUT0/model.params

    # what the MPIJob launcher runs (hostfile from the MPI Operator)
    mpirun -np 8 -bind-to none -map-by slot -x LD_LIBRARY_PATH -x PATH \\
        -mca pml ob1 -mca btl ^openib finetune-job train --config /etc/finetune-job/config.yaml

Exit codes: one table for every subcommand, ``job.exitcodes`` (README, "Exit codes").

These are the training side's subcommands; ``deploy.entry`` adds the Kubernetes side's to
them for the ``finetune-job`` command. The subcommands load what they need when they run:
``train``, ``prepare``, ``evaluate``, ``predict`` and ``export`` need the ``[train]`` extra
(MXNet, numpy, OpenCV); a missing one is named in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import job
from job import config as config_mod
from job import logs
from job.exitcodes import ExitCode

log = logging.getLogger("finetune_job")

# The extra that brings each optional top-level module (Horovod is built by `make install`).
EXTRAS = {
    "mxnet": "train",
    "numpy": "train",
    "cv2": "train",
    "prometheus_client": "train",
    "kubernetes": "deploy",
}

TRAIN_EXAMPLE = """example:
  finetune-job train --data ./ds --output ./out --pretrained zoo --epochs 5
  horovodrun -np 2 -H localhost:2 finetune-job train --config train.yaml
  FINETUNE_LR=0.02 finetune-job train --data s3://bucket/ds --output s3://bucket/run1

where values come from, highest first:
  1. the options above
  2. environment variables FINETUNE_<KEY>, one per option, named in [brackets] above
     (FINETUNE_LR=0.02, FINETUNE_LR_STEPS=30,60, FINETUNE_TTA=true)
  3. the YAML file of --config or FINETUNE_CONFIG (keys as the options, with _:
     lr_steps: [30, 60])
  4. the defaults shown
--data and --output have no default: give them in one of the three ways.
A bad value stops the job at start with one line and exit code 2.
"""
PREPARE_EXAMPLE = """example:
  finetune-job prepare ./images ./ds --resize 256 --val-fraction 0.1
  finetune-job prepare ./images s3://bucket/ds --s3-endpoint-url http://127.0.0.1:9000

SRC holds one folder per class, each with JPEG/PNG images.
"""
EVALUATE_EXAMPLE = """example:
  finetune-job evaluate --data ./ds --model ./out --tta
  finetune-job evaluate --data ./ds --model ./out --format json --output ./out/eval.json
"""
PREDICT_EXAMPLE = """example:
  finetune-job predict --model ./out photos/ --output predictions.jsonl
  finetune-job predict --model s3://bucket/runs/r1 s3://bucket/inbox/ --engine onnx --top-k 3
  finetune-job predict --model ./out ./ds --split val --format csv --output val.csv

SOURCE: an image file, a folder (recursive), a dataset root written by prepare, or an
s3:// prefix. One JSONL line per image; unreadable images get an "error" field.
"""
EXPORT_EXAMPLE = """example:
  finetune-job export --onnx ./out
  finetune-job export --onnx s3://bucket/runs/r1 --onnx-preprocess

Writes MODEL_DIR/model.onnx (checked against the MXNet export) and MODEL_DIR/triton/.
"""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command, with the hint to ask for --help
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        """Unknown options are reported by the command they were given to, so the hint
        names that command's --help."""
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self._commands is not None:
            command = self._commands.get(getattr(ns, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    _commands: Mapping[str, argparse.ArgumentParser] | None = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Epilogs as written, and each option's default (train's come from Config's help)."""


def bounded(kind: type, low: float, high: float, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: ``kind`` within [low, high] (or [low, high)), else one line."""

    def parse(raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {raw!r}") from e
        if not (low <= value < high if high_open else low <= value <= high):
            bracket = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}{bracket}, got {raw}")
        return value  # type: ignore[no-any-return]

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


AddCommands = Callable[[Any], None]  # adds subcommands to an argparse subparsers object


def build_parser(*more: AddCommands) -> argparse.ArgumentParser:
    """The training subcommands, and those each of ``more`` adds (the upper layer's)."""
    parser = Parser(
        prog="finetune-job",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {job.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = HelpFormatter

    train = sub.add_parser(
        "train", help="fine-tune a pretrained ResNet", epilog=TRAIN_EXAMPLE, formatter_class=fmt
    )
    config_mod.add_arguments(train)
    train.set_defaults(func=_train)

    prepare = sub.add_parser(
        "prepare",
        help="turn an image folder into RecordIO shards",
        epilog=PREPARE_EXAMPLE,
        formatter_class=fmt,
    )
    prepare.add_argument("src", help="image folder, one subfolder per class")
    prepare.add_argument("dest", help="dataset root (local path or s3://)")
    prepare.add_argument(
        "--resize",
        metavar="N",
        type=bounded(int, 16, 8192),
        default=256,
        help="shorter side in pixels",
    )
    prepare.add_argument(
        "--val-fraction",
        metavar="X",
        type=bounded(float, 0, 1, high_open=True),
        default=0.1,
        help="share held out for validation, per class",
    )
    prepare.add_argument(
        "--shard-size",
        metavar="N",
        type=bounded(int, 1, 10**7),
        default=1000,
        help="records per shard",
    )
    prepare.add_argument(
        "--quality", metavar="N", type=bounded(int, 1, 100), default=95, help="JPEG quality"
    )
    prepare.add_argument(
        "--workers",
        metavar="N",
        type=bounded(int, 0, 1024),
        default=0,
        help="processes (0: all cores)",
    )
    prepare.add_argument(
        "--seed",
        metavar="N",
        type=bounded(int, 0, config_mod.SEED_MAX),
        default=0,
        help="seed of the split",
    )
    prepare.add_argument(
        "--max-pixels",
        metavar="N",
        type=bounded(int, 1, 10**10),
        default=50_000_000,
        help="images with more pixels (read from the file header) are skipped, not decoded",
    )
    prepare.add_argument(
        "--verify", action="store_true", help="re-read every shard and check sha256"
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="DEST holds a dataset: write a new version beside it and replace the manifest "
        "last (without it, a non-empty DEST is refused)",
    )
    _add_s3_arguments(prepare)
    prepare.set_defaults(func=_prepare)

    evaluate = sub.add_parser(
        "evaluate",
        help="accuracy of an exported model on a dataset",
        epilog=EVALUATE_EXAMPLE,
        formatter_class=fmt,
    )
    evaluate.add_argument("--data", required=True, help="dataset root written by prepare")
    evaluate.add_argument("--model", required=True, help="a training run's OUTPUT")
    evaluate.add_argument("--split", default="val", choices=("train", "val"), help="split")
    evaluate.add_argument("--tta", action="store_true", help="also report five-crop accuracy")
    evaluate.add_argument(
        "--batch-size", metavar="N", type=bounded(int, 1, 4096), default=64, help="images per batch"
    )
    evaluate.add_argument(
        "--format", default="text", choices=("text", "json"), help="json: the eval.json document"
    )
    evaluate.add_argument("--output", help="also write the eval.json document here")
    evaluate.add_argument(
        "--worst",
        metavar="N",
        type=bounded(int, 0, 10_000),
        default=16,
        help="highest-confidence mistakes to list",
    )
    _add_s3_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = sub.add_parser(
        "predict",
        help="batch predictions of an exported model (JSONL or CSV)",
        epilog=PREDICT_EXAMPLE,
        formatter_class=fmt,
    )
    predict.add_argument("--model", required=True, help="a training run's OUTPUT")
    predict.add_argument("sources", nargs="+", metavar="SOURCE", help="images to predict")
    predict.add_argument("--output", help="file (local or s3://); default: stdout")
    predict.add_argument("--format", default="jsonl", choices=("jsonl", "csv"))
    predict.add_argument(
        "--top-k",
        metavar="K",
        type=bounded(int, 1, 1000),
        default=5,
        help="classes per image (default 5)",
    )
    predict.add_argument("--engine", default="mxnet", choices=("mxnet", "onnx"))
    predict.add_argument("--tta", action="store_true", help="mean softmax of five crops")
    predict.add_argument(
        "--batch-size", metavar="N", type=bounded(int, 1, 4096), default=32, help="images per batch"
    )
    predict.add_argument(
        "--split", default="val", choices=("train", "val"), help="split of a dataset SOURCE"
    )
    _add_s3_arguments(predict)
    predict.set_defaults(func=_predict)

    export = sub.add_parser(
        "export",
        help="ONNX model and Triton repository for a finished run",
        epilog=EXPORT_EXAMPLE,
        formatter_class=fmt,
    )
    export.add_argument("--onnx", required=True, metavar="MODEL_DIR", help="a run's OUTPUT")
    config_mod.add_arguments(export, EXPORT_KEYS)
    _add_s3_arguments(export)
    export.set_defaults(func=_export)

    for add in more:
        add(sub)
    parser._commands = sub.choices  # for usage errors naming the command
    return parser


# The flags of `export` that are train's Config keys too: the same rules and defaults.
EXPORT_KEYS = ("onnx_preprocess", "triton_model_name", "triton_max_batch_size")


def _add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    """The S3 keys of `train`'s Config, for the commands that take no config file."""
    config_mod.add_arguments(parser, config_mod.S3_KEYS)


def _s3_storage(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from job.storage import S3Settings, Storage

    return Storage(S3Settings.from_config(config_mod.flag_values(vars(args), config_mod.S3_KEYS)))


def _train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(vars(args))
    logs.configure(cfg.log_format)
    _set_thread_defaults(cfg.threads)
    from job.training import lifecycle

    lifecycle.run(cfg)
    return ExitCode.OK


def _prepare(args: argparse.Namespace) -> int:
    from job.input import prepare

    config_mod.check_uri("prepare DEST", args.dest)
    storage = _s3_storage(args)
    prepare.prepare(
        args.src,
        args.dest,
        storage,
        max_pixels=args.max_pixels,
        resize=args.resize,
        val_fraction=args.val_fraction,
        shard_size=args.shard_size,
        quality=args.quality,
        workers=args.workers,
        seed=args.seed,
        verify=args.verify,
        overwrite=args.overwrite,
    )
    return ExitCode.OK


def _evaluate(args: argparse.Namespace) -> int:
    _set_thread_defaults(0)
    from job.outputs import evaluate

    config_mod.check_uri("evaluate --data", args.data)
    config_mod.check_uri("evaluate --model", args.model)
    storage = _s3_storage(args)
    doc = evaluate.evaluate_export(
        args.data,
        args.model,
        storage,
        split=args.split,
        tta=args.tta,
        batch_size=args.batch_size,
        worst=args.worst,
    )
    text = json.dumps(doc, indent=1)
    if args.output:
        storage.write_bytes(args.output, text.encode())
    if args.format == "json":
        print(text)
    else:
        keys = ("images", "top1", "top5", "top1_tta", "ece")
        print(" ".join(f"{k}={doc[k]:.4f}" if isinstance(doc[k], float) else f"{k}={doc[k]}"
                       for k in keys if k in doc))  # fmt: skip
    return ExitCode.OK


def _predict(args: argparse.Namespace) -> int:
    _set_thread_defaults(0)
    from job.outputs import predict

    predict.predict(
        args.model,
        args.sources,
        _s3_storage(args),
        output=args.output,
        fmt=args.format,
        top_k=args.top_k,
        engine=args.engine,
        tta=args.tta,
        batch_size=args.batch_size,
        split=args.split,
        progress=sys.stderr if sys.stderr.isatty() else None,
    )
    return ExitCode.OK


def _export(args: argparse.Namespace) -> int:
    _set_thread_defaults(0)
    from job.outputs import export

    keys = config_mod.flag_values(vars(args), EXPORT_KEYS)
    check = export.export_run(
        args.onnx,
        _s3_storage(args),
        preprocess=keys["onnx_preprocess"],
        name=keys["triton_model_name"],
        max_batch_size=keys["triton_max_batch_size"],
    )
    print(" ".join(f"{k}={v}" for k, v in check.items()))
    return ExitCode.OK


def _set_thread_defaults(threads: int) -> None:
    """Threads per process before MXNet loads: the node's cores split among its workers.

    MXNet otherwise takes half the cores per process, and Open MPI's busy polling steals
    compute on small machines; both are read when the libraries load, hence here.
    """
    local_size = int(
        os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("HOROVOD_LOCAL_SIZE") or 1
    )
    per_process = threads or max(1, (os.cpu_count() or 1) // local_size)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_process))
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def main(
    argv: Sequence[str] | None = None,
    build: Callable[[], argparse.ArgumentParser] = build_parser,
) -> int:
    """Parse ``argv`` with the parser ``build`` makes and run the command under the guard."""
    logs.configure("text")  # train switches to its config's log_format once it is known
    try:
        args = build().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    return run_guarded(func, args)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; known failures become one line on stderr and an exit code. The one
    guard of every subcommand, the Kubernetes side's included."""
    from job.errors import JobError

    try:
        return func(args)
    except config_mod.ConfigError as e:
        return _fail(e, ExitCode.BAD_INPUT)
    except JobError as e:
        code = _fail(e, e.exit_code)
        _settle_mxnet()
        return code
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").partition(".")[0])
        if extra is None and (e.name or "").partition(".")[0] != "horovod":
            raise  # not a missing extra: a bug, with its traceback
        return _fail(missing_extra(args.command, e.name or "", extra), ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as e:
        if not _another_rank_failed(e):
            raise
        # This rank only saw the collective break; the rank that failed said why.
        _settle_mxnet()
        return _fail("stopped because another rank failed (its error is above)", ExitCode.FAILED)


def _another_rank_failed(e: BaseException) -> bool:
    """Horovod's way of telling a rank that a peer exited: HorovodInternalError, or an
    MXNetError from a collective saying Horovod has been shut down."""
    return type(e).__name__ == "HorovodInternalError" or "Horovod has been shut down" in str(e)


def _settle_mxnet() -> None:
    """Collect MXNet's pending asynchronous error (a collective broken by a peer's exit), so
    it is not raised again, with a traceback, by MXNet's exit hook."""
    if "mxnet" not in sys.modules:
        return
    import mxnet as mx

    try:
        mx.nd.waitall()
    except Exception:  # noqa: BLE001 - already reported in one line; only silence it here
        log.debug("pending MXNet error collected at exit", exc_info=True)


def missing_extra(command: str, module: str, extra: str | None) -> str:
    """One line saying what to install for ``command``."""
    if extra is None:
        return (
            f"{command} needs Horovod (no module '{module}'); `make install` builds it with "
            "MXNet, Gloo and MPI support (see the README)"
        )
    return (
        f"{command} needs the [{extra}] extra (no module '{module}'): "
        f"pip install 'finetune-job[{extra}]'"
    )


def _fail(e: object, code: int) -> int:
    """The one error line: plain text, or a JSON object when the logs are JSON."""
    if logs.active_format() == "json":
        log.error(str(e), extra={"event": "error"})
    else:
        print(f"finetune-job: error: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
