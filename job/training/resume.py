"""Resuming a run: the newest checkpoint of this run, or of the earlier attempt it continues.

A checkpoint of another run (its fingerprint differs) is refused before anything is loaded.
The progress it holds says where in the epoch training stands, in images, so a run resumed on
another number of workers trains the rest of the epoch's images once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from job.training import fingerprint
from job.training.checkpoint import Checkpointer

if TYPE_CHECKING:
    from job.training.loop import Run

log = logging.getLogger(__name__)


def resume(run: Run) -> None:
    """Continue from the newest checkpoint of this run (or of ``resume_from``), if any."""
    if run.cfg.resume == "never":
        return

    # A checkpoint of another run (other model, classes, data or hyper-parameters) is
    # refused before anything is loaded, unless the operator forces it.
    def check_fingerprint(state: dict[str, Any], folder: str) -> None:
        fingerprint.check(state, run.fingerprint, folder)

    check = None if run.cfg.resume == "force" else check_fingerprint
    restored = run.checkpointer.restore(
        run.net, run.trainer, run.ctx, warn=run.dist.is_primary, check=check
    )
    if restored is None and run.cfg.resume_from:
        # An earlier attempt of this run (a failed scheduled run) left its checkpoints
        # in another output: continue from there, under the same fingerprint check.
        earlier = Checkpointer(run.storage, run.cfg.resume_from, run.cfg.keep_checkpoints)
        restored = earlier.restore(
            run.net, run.trainer, run.ctx, warn=run.dist.is_primary, check=check
        )
        run.checkpointer.run_id = earlier.run_id
    if restored is None:
        return
    folder, run.progress, _ = restored
    run.resumed_from = folder
    if not run.progress.workers:  # written before checkpoints counted images
        run.progress.workers = run.dist.size
        run.progress.images = run.progress.batch * run.cfg.batch_size * run.dist.size
    run.stats.seed_corrupt(run.progress.corrupt)
    run.watchdog.checkpoint = folder
    p = run.progress
    moved = f" (trained by {p.workers} workers, now {run.dist.size})"
    log.info(
        "resumed from %s: epoch %d, step %d%s",
        folder,
        p.epoch + 1,
        p.step,
        moved if p.workers not in (0, run.dist.size) else "",
    )
