"""The ``finetune-job`` command.

Runbook (the same lines the Helm chart renders for the MPI Operator's launcher)::

    # one process, no launcher
    finetune-job train --data s3://bucket/ds --output s3://bucket/runs/r1

    # 2 workers on this machine
    horovodrun -np 2 -H localhost:2 finetune-job train --data DIR --output OUT \\
        --pretrained OUT0/model.params

    # what the MPIJob launcher runs (hostfile from the MPI Operator)
    mpirun -np 8 -bind-to none -map-by slot -x LD_LIBRARY_PATH -x PATH \\
        -mca pml ob1 -mca btl ^openib finetune-job train --config /etc/finetune-job/config.yaml

Exit codes: 0 done, 1 training failed (diverged, data or storage error), 2 bad config or
arguments, 130 interrupted, 143 stopped by SIGTERM after checkpointing the current step
(run the same command again to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from job import config as config_mod
from job import logs

log = logging.getLogger("finetune_job")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

TRAIN_EXAMPLE = """example:
  finetune-job train --data ./ds --output ./out --pretrained zoo --epochs 5
  horovodrun -np 2 -H localhost:2 finetune-job train --config train.yaml
  FINETUNE_LR=0.02 finetune-job train --data s3://bucket/ds --output s3://bucket/run1
"""
PREPARE_EXAMPLE = """example:
  finetune-job prepare ./images ./ds --resize 256 --val-fraction 0.1
  finetune-job prepare ./images s3://bucket/ds --s3-endpoint-url http://127.0.0.1:9000

SRC holds one folder per class, each with JPEG/PNG images.
"""
EVALUATE_EXAMPLE = """example:
  finetune-job evaluate --data ./ds --model ./out --tta
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-job",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

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
        "--resize", type=int, default=256, help="shorter side in pixels (default 256)"
    )
    prepare.add_argument(
        "--val-fraction", type=float, default=0.1, help="share held out for validation"
    )
    prepare.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    prepare.add_argument("--quality", type=int, default=95, help="JPEG quality")
    prepare.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prepare.add_argument(
        "--verify", action="store_true", help="re-read every shard and check sha256"
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
    evaluate.add_argument("--split", default="val", choices=("train", "val"))
    evaluate.add_argument("--tta", action="store_true", help="also report five-crop accuracy")
    evaluate.add_argument("--batch-size", type=int, default=64)
    _add_s3_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)

    _register_deploy(sub)
    return parser


def _add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    """The S3 keys of `train`'s Config, for the commands that take no config file."""
    config_mod.add_arguments(parser, config_mod.S3_KEYS)


def _s3_storage(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from job.storage import S3Settings, Storage

    return Storage(S3Settings.from_config(config_mod.flag_values(vars(args), config_mod.S3_KEYS)))


def _register_deploy(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from deploy import cli as deploy_cli
    except ImportError:  # the Kubernetes side is optional at run time
        return
    deploy_cli.register(sub)


def _train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(vars(args))
    logs.configure(cfg.log_format)
    _set_thread_defaults(cfg.threads)
    from job import train

    train.run(cfg)
    return EXIT_OK


def _prepare(args: argparse.Namespace) -> int:
    from job import prepare

    storage = _s3_storage(args)
    prepare.prepare(
        args.src,
        args.dest,
        storage,
        resize=args.resize,
        val_fraction=args.val_fraction,
        shard_size=args.shard_size,
        quality=args.quality,
        workers=args.workers,
        seed=args.seed,
        verify=args.verify,
    )
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    _set_thread_defaults(0)
    from job import evaluate

    storage = _s3_storage(args)
    result = evaluate.evaluate_export(
        args.data, args.model, storage, split=args.split, tta=args.tta, batch_size=args.batch_size
    )
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    return EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure("text")  # train switches to its config's log_format once it is known
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return run_guarded(func, args)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; known failures become one line on stderr and an exit code."""
    from job.errors import JobError

    try:
        return func(args)
    except config_mod.ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    except JobError as e:
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _error(message: str) -> None:
    """The one error line: plain text, or a JSON object when the logs are JSON."""
    if logs.active_format() == "json":
        log.error(message, extra={"event": "error"})
    else:
        print(f"finetune-job: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
