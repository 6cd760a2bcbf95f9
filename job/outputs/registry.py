"""Training outputs that build on each other: run names, per-run outputs, a gate, ``latest``.

Under an output root (local path or ``s3://``; the tree is ``job.layout``'s), each run
writes to ``<root>/runs/<run name>/`` and ``<root>/latest`` names the promoted one.

After a run succeeds, ``finish_run`` reads its ``summary.json`` and, only if it passes the
gate (``min_accuracy`` on ``val_top1``; optionally not worse than the current ``latest``;
optionally no class's recall in ``eval.json`` down by more than ``max_class_drop``),
rewrites ``latest`` -- the last write of the run, so a bad or unfinished run never becomes
``latest``. A later run given ``--pretrained <root>/latest`` starts from that model:
``resolve_pretrained`` turns the pointer into the model's URI.

These are training-output concepts: ``job.training.model`` resolves ``latest`` and ``deploy`` names
and gates the runs it submits, both through this module.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from job import layout
from job.errors import GateError, InputError
from job.storage import Storage, StorageError, join

LATEST, SUMMARY, EVAL, MODEL = layout.LATEST, layout.SUMMARY, layout.EVAL, layout.MODEL
METRIC = "val_top1"
# A run name is also the MPIJob's name: the MPI Operator derives `<name>-worker-<i>` pod
# hostnames (DNS labels, at most 63 characters) and a `<name>-worker` Service (which must start
# with a letter). 50 leaves room for `-worker-9999`.
MAX_RUN_NAME = 50


def run_name(prefix: str, now: dt.datetime | None = None, rng: random.Random | None = None) -> str:
    """``<prefix>-<yyyymmdd-hhmmss UTC>-<4 of [a-z0-9]>``, at most ``MAX_RUN_NAME`` long.

    The prefix is lowercased, other characters become ``-``, it is cut to fit, and it gets
    an ``r`` in front when it would not start with a letter.
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    alphabet = string.ascii_lowercase + string.digits
    pick = rng.choice if rng is not None else secrets.choice
    suffix = f"-{now:%Y%m%d-%H%M%S}-" + "".join(pick(alphabet) for _ in range(4))
    clean = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = ("r-" + clean).rstrip("-")
    clean = clean[: MAX_RUN_NAME - len(suffix)].rstrip("-")
    return clean + suffix


run_output = layout.run_folder


def is_latest_uri(uri: str) -> bool:
    return uri.rstrip("/").rsplit("/", 1)[-1] == LATEST


def _read_json(storage: Storage, uri: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(storage.read_bytes(uri))
    except StorageError:
        raise
    except ValueError as e:
        raise InputError(f"{what} {uri} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InputError(f"{what} {uri} must hold a JSON object")
    return doc


def read_summary(storage: Storage, run_uri: str) -> dict[str, Any]:
    uri = join(run_uri, SUMMARY)
    if not storage.exists(uri):
        raise GateError(f"{uri}: the run wrote no {SUMMARY}")
    try:
        return _read_json(storage, uri, SUMMARY)
    except InputError as e:
        raise GateError(str(e)) from e


def read_latest(storage: Storage, root: str) -> dict[str, Any] | None:
    """The current pointer, or None before any run passed the gate."""
    uri = join(root, LATEST)
    return _read_json(storage, uri, "latest pointer") if storage.exists(uri) else None


def metric(summary: dict[str, Any], where: str) -> float:
    value = summary.get(METRIC)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GateError(f"{where}: summary has no numeric '{METRIC}' (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class Gate:
    """What a successful run must reach to become ``latest``."""

    min_accuracy: float | None = None
    not_worse: bool = False
    max_class_drop: float = 0.0  # 0: off; else no class's recall may fall more than this

    def rejects(self, accuracy: float, latest_accuracy: float | None) -> str | None:
        """Why a run with ``accuracy`` fails the gate, or None when it passes."""
        if self.min_accuracy is not None and accuracy < self.min_accuracy:
            return f"{METRIC} {accuracy:.4f} is below --min-accuracy {self.min_accuracy:.4f}"
        if self.not_worse and latest_accuracy is not None and accuracy < latest_accuracy:
            return f"{METRIC} {accuracy:.4f} is worse than latest's {latest_accuracy:.4f}"
        return None


def latest_accuracy(storage: Storage, root: str, pointer: dict[str, Any] | None) -> float | None:
    """The current latest run's accuracy: from its summary.json, else from the pointer."""
    if pointer is None:
        return None
    run = pointer.get("run")
    if isinstance(run, str) and run and storage.exists(join(run_output(root, run), SUMMARY)):
        return metric(read_summary(storage, run_output(root, run)), f"latest run {run}")
    return metric(pointer, join(root, LATEST))


def promote(
    storage: Storage, root: str, run: str, accuracy: float, version: str | None
) -> dict[str, Any] | None:
    """Point ``<root>/latest`` at ``run``'s model if ``latest`` is still at ``version``
    (None: still absent); returns the pointer written, or None when another run promoted
    itself in between."""
    pointer = {"run": run, "model": join(run_output(root, run), MODEL), METRIC: accuracy}
    data = (json.dumps(pointer, indent=2) + "\n").encode()
    return pointer if storage.put_if(join(root, LATEST), data, version) else None


def _read_latest_versioned(storage: Storage, root: str) -> tuple[dict[str, Any] | None, str | None]:
    uri = join(root, LATEST)
    data, version = storage.read_versioned(uri)
    if data is None:
        return None, None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise InputError(f"latest pointer {uri} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InputError(f"latest pointer {uri} must hold a JSON object")
    return doc, version


def finish_run(
    storage: Storage, root: str, run: str, gate: Gate, attempts: int = 10
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gate a succeeded run and promote it; returns (summary, pointer).

    The gate judges against the ``latest`` it read, and the write succeeds only if
    ``latest`` is still that one (compare-and-swap); when another run got there first, it
    reads and judges again, so two runs finishing together cannot both pass on the same
    old ``latest`` and leave the worse one promoted.

    Raises GateError (the summary is attached as ``.summary``) when the run does not pass.
    """
    summary = read_summary(storage, run_output(root, run))
    accuracy = metric(summary, join(run_output(root, run), SUMMARY))
    for _ in range(attempts):
        pointer, version = _read_latest_versioned(storage, root)
        why = gate.rejects(
            accuracy, latest_accuracy(storage, root, pointer) if gate.not_worse else None
        )
        why = why or class_drops(storage, root, run, pointer, gate.max_class_drop)
        if why:
            raise GateError(f"run {run}: {why}; {join(root, LATEST)} left unchanged", summary)
        written = promote(storage, root, run, accuracy, version)
        if written is not None:
            return summary, written
    raise GateError(
        f"run {run}: {join(root, LATEST)} kept changing under {attempts} promotion attempts; "
        "left unchanged",
        summary,
    )


def class_drops(
    storage: Storage, root: str, run: str, pointer: dict[str, Any] | None, max_drop: float
) -> str | None:
    """Why ``run`` fails the per-class gate against the eval.json of the run ``pointer``
    (the current latest) names, or None.

    Off when ``max_drop`` is 0, before any latest, or when either run has no eval.json (a
    run without a validation split cannot be compared per class).
    """
    latest_run = pointer.get("run") if pointer and max_drop > 0 else None
    if not isinstance(latest_run, str) or not latest_run:
        return None
    new_uri = join(run_output(root, run), EVAL)
    old_uri = join(run_output(root, latest_run), EVAL)
    if not (storage.exists(new_uri) and storage.exists(old_uri)):
        return None
    drops = recall_drops(
        _read_json(storage, new_uri, EVAL), _read_json(storage, old_uri, EVAL), max_drop
    )
    if not drops:
        return None
    worst = ", ".join(f"{c} {old:.3f} -> {new:.3f}" for c, old, new in drops)
    return f"recall dropped by more than --max-class-drop {max_drop:g} vs {latest_run}: {worst}"


def recall_drops(
    new: dict[str, Any], old: dict[str, Any], max_drop: float
) -> list[tuple[str, float, float]]:
    """Classes whose recall fell by more than ``max_drop`` from ``old`` to ``new`` eval.json
    documents: (class, old recall, new recall). Classes are matched by name; one that is
    new, or had no images before, cannot have dropped."""
    before = {c["class"]: c for c in old.get("per_class", [])}
    drops = []
    for row in new.get("per_class", []):
        was = before.get(row["class"])
        if was is None or not was.get("count"):
            continue
        if was["recall"] - row["recall"] > max_drop + 1e-12:
            drops.append((row["class"], float(was["recall"]), float(row["recall"])))
    return drops


def resolve_pretrained(uri: str, storage: Storage, *, if_missing: str | None = None) -> str:
    """``<root>/latest`` -> that run's ``model.params`` URI; any other URI unchanged.

    Before any run passed the gate there is no pointer: return ``if_missing`` when given
    (e.g. ``"zoo"`` for the first scheduled run), else fail naming the URI.
    """
    if not is_latest_uri(uri):
        return uri
    if not storage.exists(uri):
        if if_missing is not None:
            return if_missing
        raise InputError(f"pretrained {uri}: no run has passed the gate yet (no latest pointer)")
    pointer = _read_json(storage, uri, "latest pointer")
    model = pointer.get("model")
    if not isinstance(model, str) or not model:
        raise InputError(f"latest pointer {uri} has no 'model' URI")
    return model
