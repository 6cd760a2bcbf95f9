"""The output tree: every name a run writes or reads, and the reads ``deploy`` needs.

Under an output root (local path or ``s3://``), as scheduled submits use it::

    <root>/runs/<run name>/          one run's OUTPUT
    <root>/latest                    {"run": NAME, "model": ".../model.params", "val_top1": X}

One run's OUTPUT (rank 0 writes all of it)::

    checkpoints/latest               pointer to the newest checkpoint (written last)
    checkpoints/step-<8 digits>-<run id>/
        model.params, trainer.states, state.json, checkpoint.json
    history.csv                      one row per epoch, rewritten after every epoch
    best/model.params, best/state.json   the best epoch's parameters so far
    model-symbol.json, model-0000.params, model.params   the exported epoch, for MXNet
    model.onnx (+ model-uint8.onnx)  the same model in ONNX
    triton/                          a Triton model repository
    eval.json                        per-class evaluation of the exported model
    report.html                      the page that shows them together
    summary.json                     written last: its presence means the rest is complete
    launcher.log                     the launcher's log, saved by ``finetune-job submit --wait``

A file is renamed here and nowhere else.
"""

from __future__ import annotations

import json
from typing import Any

from job.storage import Storage, StorageError, join

RUNS = "runs"
LATEST = "latest"  # the root's promoted run; also the name of the checkpoint pointer
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # a checkpoint's progress and config; best/'s epoch
CHECKPOINT_MANIFEST = "checkpoint.json"
TRAINER_STATES = "trainer.states"
MODEL = "model.params"
EXPORT_PREFIX = "model"  # gluon's export(prefix, epoch=0) names the two files below
SYMBOL = f"{EXPORT_PREFIX}-symbol.json"
EXPORT_PARAMS = f"{EXPORT_PREFIX}-0000.params"
ONNX = "model.onnx"
ONNX_UINT8 = "model-uint8.onnx"
TRITON = "triton"
HISTORY = "history.csv"
BEST = "best"
EVAL = "eval.json"
REPORT = "report.html"
SUMMARY = "summary.json"
LAUNCHER_LOG = "launcher.log"
# The exported model for MXNet: the symbol and its parameters, and the plain parameters.
MXNET_MODEL = (SYMBOL, EXPORT_PARAMS, MODEL)


def run_folder(root: str, run: str) -> str:
    """Where run ``run`` writes: ``<root>/runs/<run>``."""
    return join(root, RUNS, run)


def checkpoints(output: str) -> str:
    return join(output, CHECKPOINTS)


def checkpoint_pointer(output: str) -> str:
    return join(output, CHECKPOINTS, LATEST)


def summary(output: str) -> str:
    return join(output, SUMMARY)


def read_summary(storage: Storage, output: str) -> dict[str, Any]:
    """A finished run's summary.json (StorageError when there is none)."""
    doc: dict[str, Any] = json.loads(storage.read_bytes(summary(output)))
    return doc


def checkpointed_config(storage: Storage, output: str) -> dict[str, Any] | None:
    """The config stored in the newest checkpoint of an unfinished run in ``output``: None
    when the run finished (it has a summary) or left no readable checkpoint."""
    try:
        if storage.exists(summary(output)) or not storage.exists(checkpoint_pointer(output)):
            return None
        pointer = json.loads(storage.read_bytes(checkpoint_pointer(output)))
        folder = join(checkpoints(output), str(pointer["checkpoint"]))
        state = json.loads(storage.read_bytes(join(folder, STATE)))
        config = state["config"]
    except (StorageError, ValueError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None
