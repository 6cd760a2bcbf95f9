"""summary.json: what a finished run was, gathered from every rank and written by rank 0
after the model files (``RunOutputs.hand_over``)."""

from __future__ import annotations

import hashlib
import resource
from typing import Any

import numpy as np
from mxnet import gluon

from job import __version__
from job.training import watchdog
from job.training.loop import Run

CORRUPT_RECORDS_COUNTS = (
    "distinct corrupt records skipped over the whole job (all ranks, all epochs, restarts "
    "included): each bad record counts once per job, however often it was read"
)


def finish(run: Run, wall_seconds: float) -> dict[str, Any] | None:
    """The summary, on every rank's behalf; rank 0 exports the model and writes both."""
    with run.watchdog.phase(watchdog.ALLREDUCE):
        digests = run.dist.allgather_object(params_digest(run.net), "params_digest")
        peak_rss = run.dist.allgather_object(peak_rss_bytes(), "peak_rss")
    corrupt = run.corrupt_keys()
    if not run.dist.is_primary:
        return None
    cfg, history = run.cfg, run.progress.history
    with run.watchdog.phase(watchdog.EXPORT):
        exported = run.outputs.choose_epoch(run.net, history, run.ctx)  # export: best|last
        last = next((h for h in history if h["epoch"] == exported), {})
        summary = {
            "model": cfg.model,
            "classes": run.classes,
            "num_classes": len(run.classes),
            "pretrained": cfg.pretrained,
            "epochs": cfg.epochs,
            "workers": run.dist.size,
            "global_batch_size": cfg.batch_size * run.dist.size,
            "exported_epoch": exported,
            "val_top1": last.get("val_top1"),  # of the exported epoch: what the gate judges
            "last_val_top1": history[-1].get("val_top1") if history else None,
            "best_val_top1": run.progress.best_val_top1,
            "train_images_per_second": _mean([h["images_per_second"] for h in history]),
            "wall_seconds": round(wall_seconds, 2),
            "corrupt_records": len(corrupt),
            "corrupt_records_counts": CORRUPT_RECORDS_COUNTS,
            "params_sha256_per_rank": digests,
            "peak_rss_bytes_per_rank": peak_rss,
            "history": history,
            "resumed_from": run.resumed_from,
            "config": cfg.to_dict(),
            "version": __version__,
        }
        if cfg.tta:
            summary["val_top1_tta"] = last.get("val_top1_tta")
        # Model files, ONNX, Triton repository, eval.json, report; summary.json last.
        run.outputs.hand_over(run.net, run.classes, summary, run.ctx)
    return summary


def params_digest(net: gluon.Block) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(net._collect_params_with_prefix().items()):  # noqa: SLF001
        digest.update(name.encode())
        digest.update(param.data().asnumpy().tobytes())
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None
