"""Resume-complete, self-checking checkpoints under ``OUTPUT/checkpoints/`` (local or S3).

A checkpoint is a folder ``step-00001234-<run id>/`` holding ``model.params``
(``save_parameters``), ``trainer.states`` (optimizer state), ``state.json`` (epoch, step,
batches done in the epoch, best metric, history, config) and, written after those,
``checkpoint.json``: the run id, the step and each file's size and sha256. The small pointer
``checkpoints/latest`` (the same facts plus the folder's name) is written last. Local writes
are fsynced (files, then folders) before the pointer, so a power cut cannot leave a pointer
to bytes that never reached the disk; S3 acknowledges a PUT only once it is stored.

Resuming checks every file against its size and digest. A pointer to a missing, partial or
altered folder falls back, with one warning, to the newest checkpoint that checks out.
Only rank 0 writes; every rank reads when resuming. Pruning keeps ``keep`` checkpoints of
this run (its run id) and never touches another run's, even in a shared output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from job import layout
from job import storage as st
from job.storage import Storage, StorageError

log = logging.getLogger(__name__)
POINTER = layout.LATEST
MANIFEST = layout.CHECKPOINT_MANIFEST
PARTS = (layout.MODEL, layout.TRAINER_STATES, layout.STATE)
NAME = re.compile(r"^step-(\d{8})-([0-9a-f]+)$")


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


@dataclass
class Snapshot:
    """A checkpoint held in memory, ready to be written by any thread."""

    name: str  # its folder's name
    step: int
    params: dict[str, Any]  # structural name -> NDArray on the CPU, as save_parameters keys it
    trainer_states: bytes  # the optimizer state, as Trainer.save_states writes it
    state: dict[str, Any]  # state.json


class CheckpointInvalidError(Exception):
    """A checkpoint folder that is missing, partial or altered; the message says which."""


class Checkpointer:
    def __init__(self, storage: Storage, output: str, keep: int) -> None:
        self.storage, self.keep = storage, keep
        self.root = layout.checkpoints(output)
        # A new run gets a new id; a resumed run takes over the id of its checkpoint.
        self.run_id = secrets.token_hex(4)

    def snapshot(
        self,
        net: Any,
        trainer: Any,
        progress: Progress,
        config: dict[str, Any],
        fingerprint: dict[str, Any] | None = None,
        replace: dict[int, Any] | None = None,
    ) -> Snapshot:
        """Copy what a checkpoint holds into memory, on the CPU: the only part of a checkpoint
        that training waits for. ``replace`` maps ``id(parameter)`` to the value to store in
        its place (the BatchNorm statistics averaged over ranks, while each rank keeps its
        own); ``fingerprint`` (job.training.fingerprint) says whose checkpoint it is."""
        import mxnet as mx

        replace = replace or {}
        params = {}
        for key, param in net._collect_params_with_prefix().items():
            value = replace.get(id(param))
            # _reduce: the parameter as save_parameters stores it, a copy on the CPU.
            params[key] = param._reduce() if value is None else value.as_in_context(mx.cpu())
        for value in params.values():
            value.wait_to_read()
        state = {
            "progress": asdict(progress),  # a deep copy
            "config": config,
            "fingerprint": fingerprint,
            "saved_at": time.time(),
        }
        name = f"step-{progress.step:08d}-{self.run_id}"
        return Snapshot(name, progress.step, params, trainer_states(trainer), state)

    def write(self, snap: Snapshot) -> str:
        """Write a snapshot's files, check what storage holds, then move the pointer to it.
        Any thread may call this. A write that fails (no space, quota, permission, a refused
        PUT) raises a one-line StorageError naming the path and the cause, removes what it
        wrote and leaves the pointer where it was."""
        import mxnet as mx

        folder = st.join(self.root, snap.name)
        try:
            with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
                try:
                    mx.nd.save(os.path.join(tmp, layout.MODEL), snap.params)
                    with open(os.path.join(tmp, layout.TRAINER_STATES), "wb") as fh:
                        fh.write(snap.trainer_states)
                    with open(os.path.join(tmp, layout.STATE), "w") as fh:
                        json.dump(snap.state, fh, indent=1)
                except (OSError, mx.base.MXNetError) as e:
                    cause = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
                    raise StorageError(
                        f"{tmp}: writing checkpoint {snap.name} failed: {cause}"
                    ) from e
                files = {part: file_facts(os.path.join(tmp, part)) for part in PARTS}
                for part in PARTS:
                    self.storage.upload(os.path.join(tmp, part), st.join(folder, part))
            manifest = {"run_id": self.run_id, "step": snap.step, "files": files}
            self.storage.write_bytes(st.join(folder, MANIFEST), json.dumps(manifest).encode())
            self.storage.sync(folder)  # every byte on disk before anything points at it
            self._verify(folder, files)
        except StorageError:
            with contextlib.suppress(StorageError, OSError):  # free what a full disk took
                self.storage.delete_prefix(folder)
            raise
        pointer = dict(manifest, checkpoint=snap.name)
        self.storage.write_bytes(
            st.join(self.root, POINTER), json.dumps(pointer).encode(), durable=True
        )
        self._prune(keep_name=snap.name)
        return folder

    def _verify(self, folder: str, files: dict[str, dict[str, Any]]) -> None:
        """Storage holds every file whole: its size there is the size written."""
        for part, facts in files.items():
            stored = self.storage.size(st.join(folder, part))
            if stored != facts["size"]:
                raise StorageError(
                    f"{folder}/{part}: storage holds {stored} bytes of {facts['size']} written"
                )

    def latest(self) -> str | None:
        """The folder the pointer names, or None before the first checkpoint (cheap: for
        messages; :meth:`restore` is what checks a checkpoint before using it)."""
        pointer = self._pointer()
        return st.join(self.root, pointer["checkpoint"]) if pointer else None

    def restore(
        self,
        net: Any,
        trainer: Any,
        ctx: Any,
        warn: bool = True,
        check: Callable[[dict[str, Any], str], None] | None = None,
    ) -> tuple[str, Progress, dict[str, Any]] | None:
        """Load the newest checkpoint whose files all check out: (its folder, progress,
        config), or None when there is none.

        Tries the pointer's checkpoint first, then this run's older ones, newest first, then
        any other; what was skipped is reported in one warning (``warn``: by this rank).
        ``check(state, folder)`` sees the chosen checkpoint's state.json before anything is
        loaded, and may refuse it by raising."""
        pointer = self._pointer()
        skipped: list[str] = []
        for name in self._candidates(pointer):
            folder = st.join(self.root, name)
            with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
                try:
                    manifest = self._verified_copy(folder, tmp)
                except CheckpointInvalidError as e:
                    skipped.append(str(e))
                    continue
                if skipped and warn:
                    log.warning(
                        "checkpoint %s; resuming from %s, the newest complete checkpoint",
                        "; ".join(skipped),
                        folder,
                    )
                if check is not None:
                    with open(os.path.join(tmp, layout.STATE)) as fh:
                        check(json.load(fh), folder)
                self.run_id = str(manifest["run_id"])
                return (folder, *self._load_local(tmp, net, trainer, ctx))
        if skipped and warn:
            log.warning("checkpoint %s; no complete checkpoint left: starting afresh", skipped[0])
        return None

    def load(
        self, folder: str, net: Any, trainer: Any, ctx: Any
    ) -> tuple[Progress, dict[str, Any]]:
        """Load ``folder`` after checking each file; CheckpointInvalidError when one does not."""
        with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
            manifest = self._verified_copy(folder, tmp)
            self.run_id = str(manifest["run_id"])
            return self._load_local(tmp, net, trainer, ctx)

    @staticmethod
    def _load_local(tmp: str, net: Any, trainer: Any, ctx: Any) -> tuple[Progress, dict[str, Any]]:
        net.load_parameters(os.path.join(tmp, layout.MODEL), ctx=ctx)
        trainer.load_states(os.path.join(tmp, layout.TRAINER_STATES))
        with open(os.path.join(tmp, layout.STATE)) as fh:
            state = json.load(fh)
        return Progress(**state["progress"]), state["config"]

    def _pointer(self) -> dict[str, Any] | None:
        """The pointer's facts; None when there is none or it cannot be read as one."""
        uri = st.join(self.root, POINTER)
        if not self.storage.exists(uri):
            return None
        try:
            pointer = json.loads(self.storage.read_bytes(uri))
        except ValueError:
            log.warning("checkpoint pointer %s is not JSON; ignoring it", uri)
            return None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("checkpoint"), str):
            log.warning("checkpoint pointer %s names no checkpoint; ignoring it", uri)
            return None
        return pointer

    def _names(self) -> list[str]:
        """Checkpoint folders of every run, newest (highest step) first."""
        found = {
            uri[len(self.root) :].strip("/").split("/")[0] for uri in self.storage.list(self.root)
        }
        return sorted((n for n in found if NAME.match(n)), key=_step_of, reverse=True)

    def _candidates(self, pointer: dict[str, Any] | None) -> list[str]:
        names = self._names()
        if pointer is None:
            return names
        run = pointer.get("run_id")
        first = [pointer["checkpoint"]]
        same_run = [n for n in names if _run_of(n) == run and n not in first]
        return first + same_run + [n for n in names if n not in first + same_run]

    def _verified_copy(self, folder: str, tmp: str) -> dict[str, Any]:
        """Copy ``folder``'s files into ``tmp`` and check them against its manifest."""
        try:
            manifest = json.loads(self.storage.read_bytes(st.join(folder, MANIFEST)))
            files = manifest["files"]
            if not isinstance(files, dict) or not isinstance(manifest["run_id"], str):
                raise TypeError(MANIFEST)
        except (StorageError, ValueError, KeyError, TypeError) as e:
            raise CheckpointInvalidError(f"{folder} is incomplete (no valid {MANIFEST})") from e
        for part in PARTS:
            local = os.path.join(tmp, part)
            try:
                self.storage.download(st.join(folder, part), local)
            except StorageError as e:
                raise CheckpointInvalidError(f"{folder} is incomplete ({part} missing)") from e
            facts = file_facts(local)
            want = files.get(part, {})
            if facts["size"] != want.get("size"):
                raise CheckpointInvalidError(
                    f"{folder}/{part} has {facts['size']} bytes, not {want.get('size')}"
                )
            if facts["sha256"] != want.get("sha256"):
                raise CheckpointInvalidError(f"{folder}/{part} does not match its sha256")
        return dict(manifest)

    def _prune(self, keep_name: str) -> None:
        """Delete this run's checkpoints older than the newest ``keep``; others' stay."""
        mine = [n for n in self._names() if _run_of(n) == self.run_id]
        for name in mine[self.keep :]:
            if name != keep_name:
                self.storage.delete_prefix(st.join(self.root, name))


def trainer_states(trainer: Any) -> bytes:
    """The optimizer state as ``Trainer.save_states`` writes it, as bytes in memory. Horovod's
    DistributedTrainer updates on the worker (no kvstore): its updater holds the state; a
    trainer that updates on a kvstore goes through a file."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if not trainer._update_on_kvstore:
        return bytes(trainer._updaters[0].get_states(dump_optimizer=True))
    with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
        path = os.path.join(tmp, layout.TRAINER_STATES)
        trainer.save_states(path)
        with open(path, "rb") as fh:
            return fh.read()


def file_facts(path: str) -> dict[str, Any]:
    """Size and sha256 of a local file, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _step_of(name: str) -> int:
    match = NAME.match(name)
    return int(match.group(1)) if match else -1


def _run_of(name: str) -> str | None:
    match = NAME.match(name)
    return match.group(2) if match else None
