"""Resume-complete checkpoints under ``OUTPUT/checkpoints/`` (local or S3).

A checkpoint is a folder ``step-00001234/`` holding ``model.params`` (``save_parameters``),
``trainer.states`` (optimizer state) and ``state.json`` (epoch, step, batches done in the
epoch, best metric, history, config). The folder is written first; the small pointer
``checkpoints/latest`` is written last, so a crash mid-checkpoint leaves the previous one
in force. Only rank 0 writes; every rank reads when resuming. Older checkpoints are pruned
to ``keep``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from job import storage as st
from job.storage import Storage

log = logging.getLogger(__name__)
POINTER = "latest"


@dataclass
class Progress:
    """Where training stands; stored in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one, when batch == 0)
    batch: int = 0  # batches of ``epoch`` already trained (by ``workers`` ranks)
    step: int = 0  # optimizer steps so far
    best_val_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Images of ``epoch`` already trained, over all ranks: the lr schedule counts epochs as
    # fractions of images, so a restart on another number of workers keeps its place.
    images: int = 0
    workers: int = 0  # the world size that trained ``batch`` (0: a checkpoint from before)
    # Corrupt records skipped so far, each once per job ([shard, offset-or-record] pairs).
    corrupt: list[list[Any]] = field(default_factory=list)


class Checkpointer:
    def __init__(self, storage: Storage, output: str, keep: int) -> None:
        self.storage, self.keep = storage, keep
        self.root = st.join(output, "checkpoints")

    def save(self, net: Any, trainer: Any, progress: Progress, config: dict[str, Any]) -> str:
        name = f"step-{progress.step:08d}"
        folder = st.join(self.root, name)
        with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
            net.save_parameters(os.path.join(tmp, "model.params"))
            trainer.save_states(os.path.join(tmp, "trainer.states"))
            state = {"progress": asdict(progress), "config": config, "saved_at": time.time()}
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                json.dump(state, fh, indent=1)
            for part in ("model.params", "trainer.states", "state.json"):
                self.storage.upload(os.path.join(tmp, part), st.join(folder, part))
        self.storage.write_bytes(
            st.join(self.root, POINTER), json.dumps({"checkpoint": name}).encode()
        )
        self._prune(keep_name=name)
        return folder

    def latest(self) -> str | None:
        """The folder of the newest complete checkpoint, or None."""
        pointer = st.join(self.root, POINTER)
        if not self.storage.exists(pointer):
            return None
        name = json.loads(self.storage.read_bytes(pointer))["checkpoint"]
        return st.join(self.root, name)

    def load(
        self, folder: str, net: Any, trainer: Any, ctx: Any
    ) -> tuple[Progress, dict[str, Any]]:
        with self.storage.local_copy(st.join(folder, "model.params")) as path:
            net.load_parameters(path, ctx=ctx)
        with self.storage.local_copy(st.join(folder, "trainer.states")) as path:
            trainer.load_states(path)
        state = json.loads(self.storage.read_bytes(st.join(folder, "state.json")))
        return Progress(**state["progress"]), state["config"]

    def _prune(self, keep_name: str) -> None:
        names = sorted(
            {uri[len(self.root) :].strip("/").split("/")[0] for uri in self.storage.list(self.root)}
            - {POINTER}
        )
        old = [n for n in names if n < keep_name][: max(0, len(names) - self.keep)]
        for name in old:
            self.storage.delete_prefix(st.join(self.root, name))
