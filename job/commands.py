"""The training side's subcommands: ``train``, ``prepare``, ``evaluate``, ``predict`` and
``export``, their flags and what each runs. ``job.cli`` puts them under one parser.

Every flag with a bound is declared with a :class:`~job.rules.Rule` and checked by
``job.rules``, as Config's keys are; a flag that is a Config key too (``evaluate --worst``,
``--batch-size``) takes that key's rule. The commands load what they need when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from job import config as config_mod
from job import logs, rules, sources
from job.exitcodes import ExitCode
from job.rules import SEED_MAX, Rule

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


def like(key: str, help: str) -> Rule:
    """Config key ``key``'s rule (its bounds), with a flag's own help."""
    return dataclasses.replace(config_mod.rule(key), help=help, chart=False, run=False)


# The bounded flags of each command: (type, default, rule).
Flags = dict[str, tuple[type, Any, Rule]]
PREPARE_FLAGS: Flags = {
    "--resize": (int, 256, Rule(help="shorter side in pixels", minimum=16, maximum=8192)),
    "--val-fraction": (
        float,
        0.1,
        Rule(
            help="share held out for validation, per class",
            minimum=0,
            maximum=1,
            exclusive_maximum=True,
        ),
    ),
    "--shard-size": (int, 1000, Rule(help="records per shard", minimum=1, maximum=10**7)),
    "--quality": (int, 95, Rule(help="JPEG quality", minimum=1, maximum=100)),
    "--workers": (int, 0, Rule(help="processes (0: all cores)", minimum=0, maximum=1024)),
    "--seed": (int, 0, Rule(help="seed of the split", minimum=0, maximum=SEED_MAX)),
    "--max-pixels": (
        int,
        50_000_000,
        Rule(
            help="images with more pixels (read from the file header) are skipped, not decoded",
            minimum=1,
            maximum=10**10,
        ),
    ),
}
EVALUATE_FLAGS: Flags = {
    "--batch-size": (int, 64, like("batch_size", "images per batch")),
    "--worst": (int, 16, like("eval_worst", "highest-confidence mistakes to list")),
}
PREDICT_FLAGS: Flags = {
    "--top-k": (int, 5, Rule(help="classes per image", minimum=1, maximum=1000)),
    "--batch-size": (int, 32, like("batch_size", "images per batch")),
}


def add_flags(parser: argparse.ArgumentParser, flags: Flags) -> None:
    """Each flag parsed and checked against its rule; the help names the bounds."""
    for name, (kind, default, rule) in flags.items():
        metavar = "X" if kind is float else "K" if name == "--top-k" else "N"
        parser.add_argument(
            name,
            metavar=metavar,
            type=rules.argument(kind, rule),
            default=default,
            help=rules.help_text(rule),
        )


def add_commands(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The training side's subcommands, on an argparse subparsers object."""
    train = sub.add_parser(
        "train", help="fine-tune a pretrained ResNet", epilog=TRAIN_EXAMPLE, formatter_class=fmt
    )
    sources.add_arguments(train)
    train.set_defaults(func=_train)

    prepare = sub.add_parser(
        "prepare",
        help="turn an image folder into RecordIO shards",
        epilog=PREPARE_EXAMPLE,
        formatter_class=fmt,
    )
    prepare.add_argument("src", help="image folder, one subfolder per class")
    prepare.add_argument("dest", help="dataset root (local path or s3://)")
    add_flags(prepare, PREPARE_FLAGS)
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
    add_flags(evaluate, EVALUATE_FLAGS)
    evaluate.add_argument(
        "--format", default="text", choices=("text", "json"), help="json: the eval.json document"
    )
    evaluate.add_argument("--output", help="also write the eval.json document here")
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
    add_flags(predict, PREDICT_FLAGS)
    predict.add_argument("--engine", default="mxnet", choices=("mxnet", "onnx"))
    predict.add_argument("--tta", action="store_true", help="mean softmax of five crops")
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
    sources.add_arguments(export, EXPORT_KEYS)
    _add_s3_arguments(export)
    export.set_defaults(func=_export)


# The flags of `export` that are train's Config keys too: the same rules and defaults.
EXPORT_KEYS = ("onnx_preprocess", "triton_model_name", "triton_max_batch_size")


def _add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    """The S3 keys of `train`'s Config, for the commands that take no config file."""
    sources.add_arguments(parser, config_mod.S3_KEYS)


def _s3_storage(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from job.storage import S3Settings, Storage

    return Storage(S3Settings.from_config(sources.flag_values(vars(args), config_mod.S3_KEYS)))


def _train(args: argparse.Namespace) -> int:
    cfg = sources.load(vars(args))
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

    keys = sources.flag_values(vars(args), EXPORT_KEYS)
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
