"""What a run hands over in OUTPUT, besides checkpoints (rank 0 writes all of it): the
history, the best epoch's parameters, the exported model (MXNet, ONNX, Triton), eval.json,
report.html, and summary.json last, its presence meaning the rest is complete. The file
names and the tree are ``job.layout``'s.

Every file is built in a local temporary folder and uploaded whole, so S3 and local outputs
are written alike and a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from mxnet import gluon

from job import layout
from job import storage as st
from job.config import Config
from job.outputs import onnx_export, report, triton
from job.storage import Storage

log = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_top1",
    "val_top1_tta",
    "lr",
    "images_per_second",
    "train_seconds",
    "seconds",
)
BEST = layout.BEST


def history_csv(history: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch with the highest ``val_top1``, the later one on ties; None without one."""
    scored = [(h["val_top1"], h["epoch"]) for h in history if h.get("val_top1") is not None]
    return max(scored)[1] if scored else None


class RunOutputs:
    """Rank 0's per-epoch files and the hand-over at the end of a run."""

    def __init__(
        self, cfg: Config, storage: Storage, beat: Callable[[], None] | None = None
    ) -> None:
        self.cfg, self.storage = cfg, storage
        self.out = cfg.output
        self.beat = beat  # progress for the step watchdog while rank 0 evaluates alone

    # After every epoch.
    def epoch_done(self, net: gluon.Block, history: list[dict[str, Any]]) -> None:
        """history.csv; and, when this epoch is the best so far, its parameters."""
        self.storage.write_bytes(st.join(self.out, layout.HISTORY), history_csv(history))
        epoch = history[-1]["epoch"]
        if self.cfg.export == "best" and best_epoch(history) == epoch:
            with tempfile.TemporaryDirectory(prefix="finetune-best-") as tmp:
                net.save_parameters(os.path.join(tmp, layout.MODEL))
                self.storage.upload(
                    os.path.join(tmp, layout.MODEL), st.join(self.out, BEST, layout.MODEL)
                )
            # After the parameters: the epoch named here is the one in the file.
            state = {"epoch": epoch, "val_top1": history[-1]["val_top1"]}
            self.storage.write_bytes(
                st.join(self.out, BEST, layout.STATE), json.dumps(state).encode()
            )

    def choose_epoch(self, net: gluon.Block, history: list[dict[str, Any]], ctx: Any) -> int:
        """Load the epoch to export into ``net`` (it holds the last); returns its number."""
        last = history[-1]["epoch"] if history else 0
        best = best_epoch(history) if self.cfg.export == "best" else None
        if best is None or best == last:
            return last
        state_uri = st.join(self.out, BEST, layout.STATE)
        saved = (
            json.loads(self.storage.read_bytes(state_uri)).get("epoch")
            if self.storage.exists(state_uri)
            else None
        )
        if saved != best:  # a crash between the parameters and the checkpoint: keep the last
            log.warning("best epoch %s has no saved parameters (found %s); exporting the last",
                        best, saved)  # fmt: skip
            return last
        with self.storage.local_copy(st.join(self.out, BEST, layout.MODEL)) as path:
            net.load_parameters(path, ctx=ctx)
        return best

    # At the end.
    def hand_over(
        self, net: gluon.HybridBlock, classes: list[str], summary: dict[str, Any], ctx: Any
    ) -> None:
        """Export, check, evaluate and report; summary.json last."""
        cfg, out = self.cfg, self.out
        with tempfile.TemporaryDirectory(prefix="finetune-export-") as tmp:
            net.export(os.path.join(tmp, layout.EXPORT_PREFIX), epoch=0)
            net.save_parameters(os.path.join(tmp, layout.MODEL))
            exported = load_symbol_block(tmp, ctx)
            doc, pred, images = self._evaluate(exported, classes, ctx)
            files = [*layout.MXNET_MODEL]
            if doc is not None:
                summary["eval"] = {k: doc[k] for k in ("images", "top1", "top5", "ece")}
                _write_json(os.path.join(tmp, layout.EVAL), doc)
                files.append(layout.EVAL)
            if cfg.onnx:
                summary["onnx"] = self._onnx(tmp, exported, classes, pred, ctx)
                files += [f for f in os.listdir(tmp) if f.endswith(".onnx")]
                files += _tree(os.path.join(tmp, layout.TRITON), layout.TRITON)
            with open(os.path.join(tmp, layout.REPORT), "w", encoding="utf-8") as fh:
                fh.write(report.run_html(summary, doc, images))
            files.append(layout.REPORT)
            for name in files:
                self.storage.upload(os.path.join(tmp, name), st.join(out, name))
        # The summary goes last: its presence means the outputs are complete.
        self.storage.write_bytes(
            st.join(out, layout.SUMMARY), json.dumps(summary, indent=1).encode()
        )
        log.info("exported epoch %s: model, ONNX, eval.json, report and summary to %s",
                 summary.get("exported_epoch"), out)  # fmt: skip

    def _evaluate(self, net: Any, classes: list[str], ctx: Any) -> tuple[Any, Any, dict]:
        """eval.json of the exported model on the validation split (None without one)."""
        from job.input.data import load_dataset
        from job.outputs.evaluate import evaluate_net, read_images

        cfg = self.cfg
        if cfg.synthetic:
            return None, None, {}
        dataset = load_dataset(cfg.data, self.storage)
        if not dataset.count("val"):
            return None, None, {}
        doc, pred = evaluate_net(
            net,
            dataset,
            "val",
            self.storage,
            ctx,
            cfg.image_size,
            tta=cfg.tta,
            batch_size=cfg.batch_size,
            worst=cfg.eval_worst,
            keep_images=8,
            on_batch=self.beat,
        )
        records = [row["record"] for row in doc["worst_mistakes"]]
        return doc, pred, read_images(dataset, "val", self.storage, records)

    def _onnx(self, tmp: str, net: Any, classes: list[str], pred: Any, ctx: Any) -> dict:
        cfg = self.cfg
        images = pred.images if pred is not None else None
        return write_onnx(
            tmp,
            net,
            classes,
            cfg.image_size,
            ctx,
            images,
            preprocess=cfg.onnx_preprocess,
            name=cfg.triton_model_name,
            max_batch_size=cfg.triton_max_batch_size,
        )


def write_onnx(
    folder: str,
    net: Any,
    classes: list[str],
    image_size: int,
    ctx: Any,
    images: Any = None,
    *,
    preprocess: bool = False,
    name: str = "finetune",
    max_batch_size: int = 64,
) -> dict[str, Any]:
    """model.onnx (+ model-uint8.onnx) and triton/ in ``folder``, next to the exported
    MXNet files; returns the ONNX-vs-MXNet check (``images``: validation crops, NCHW)."""
    import numpy as np

    path = os.path.join(folder, layout.ONNX)
    onnx_export.export(
        os.path.join(folder, layout.SYMBOL),
        os.path.join(folder, layout.EXPORT_PARAMS),
        path,
        image_size,
        len(classes),
    )
    if images is None:  # no validation images: random inputs still compare the two models
        shape = (8, 3, image_size, image_size)
        images = np.random.default_rng(0).standard_normal(shape, np.float32)
    check = onnx_export.compare(path, net, images, ctx)
    repo = os.path.join(folder, layout.TRITON)
    triton.write_model(repo, name, path, classes, image_size, max_batch_size)
    if preprocess:
        pixels = os.path.join(folder, layout.ONNX_UINT8)
        onnx_export.add_preprocessing(path, pixels)
        triton.write_model(
            repo, name + "_uint8", pixels, classes, image_size, max_batch_size, pixels=True
        )
    return check.to_dict()


def export_run(
    model_dir: str,
    storage: Storage,
    *,
    preprocess: bool = False,
    name: str = "finetune",
    max_batch_size: int = 64,
) -> dict[str, Any]:
    """``finetune-job export --onnx MODEL_DIR``: ONNX and Triton files for a finished run
    (one from before the job wrote them, or again with other options)."""
    import mxnet as mx

    from job.outputs.evaluate import load_export

    ctx = mx.cpu()
    _, summary = load_export(model_dir, storage, ctx)  # fails in one line if not a run
    image_size = int(summary["config"]["image_size"])
    with tempfile.TemporaryDirectory(prefix="finetune-export-") as tmp:
        for part in (layout.SYMBOL, layout.EXPORT_PARAMS):
            storage.download(st.join(model_dir, part), os.path.join(tmp, part))
        net = load_symbol_block(tmp, ctx)
        check = write_onnx(
            tmp,
            net,
            summary["classes"],
            image_size,
            ctx,
            preprocess=preprocess,
            name=name,
            max_batch_size=max_batch_size,
        )
        files = [f for f in os.listdir(tmp) if f.endswith(".onnx")]
        for rel in files + _tree(os.path.join(tmp, layout.TRITON), layout.TRITON):
            storage.upload(os.path.join(tmp, rel), st.join(model_dir, rel))
    return check


def load_symbol_block(folder: str, ctx: Any) -> gluon.SymbolBlock:
    """The exported files of ``folder`` as a network: what serving will run."""
    with warnings.catch_warnings():  # "Cannot decide type for ... data": it is float32
        warnings.simplefilter("ignore", UserWarning)
        return gluon.SymbolBlock.imports(
            os.path.join(folder, layout.SYMBOL),
            ["data"],
            os.path.join(folder, layout.EXPORT_PARAMS),
            ctx=ctx,
        )


def _write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)


def _tree(folder: str, prefix: str) -> list[str]:
    """Files below ``folder`` as paths relative to its parent, named from ``prefix``."""
    found = []
    for root, _, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        found += [os.path.normpath(os.path.join(prefix, rel, n)) for n in names]
    return sorted(found)
