"""What makes a run this run: stored in every checkpoint, compared before resuming.

A resume continues a run only when the model, the class list, the dataset (its manifest's
sha256) and the hyper-parameters that define the run are the same. A different ``lr`` or
``seed`` would silently "resume" someone else's run, and another class count or model
would not even load. Keys that only steer how the run is carried out (workers, threads,
logging, metrics, storage, ``epochs`` to extend a run) are left out, so a run can resume on
another number of workers or with more epochs. ``--resume force`` resumes anyway.
"""

from __future__ import annotations

import hashlib
from typing import Any

from job import storage as st
from job.config import FIELDS, Config, rule
from job.errors import InputError
from job.storage import Storage

# Config keys that define the run (their Rule says run=True), in the order a difference is
# reported. The rest are left out on purpose: where things go (data is covered by the
# manifest's digest), how long (epochs may grow), how the run is carried out and watched.
RUN_KEYS = tuple(name for name in FIELDS if rule(name).run)


def manifest_digest(cfg: Config, storage: Storage) -> str:
    """sha256 of the dataset's manifest.json (which names every shard and its digest);
    "synthetic" for the in-memory dataset."""
    if cfg.synthetic:
        return "synthetic"
    return hashlib.sha256(storage.read_bytes(st.join(cfg.data, "manifest.json"))).hexdigest()


def of_run(cfg: Config, classes: list[str], digest: str) -> dict[str, Any]:
    """The fingerprint: JSON types only, so it compares equal after a round trip."""
    values = cfg.to_dict()
    return {
        "classes": list(classes),
        "manifest_sha256": digest,
        **{key: values[key] for key in RUN_KEYS},
    }


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first key whose value differs (classes and dataset first), or None."""
    for key in current:
        if saved.get(key) != current[key]:
            return key
    return None


def check(state: dict[str, Any], current: dict[str, Any], folder: str) -> None:
    """Raise InputError naming the first differing key unless ``state`` (a checkpoint's
    state.json) was written by a run with the ``current`` fingerprint."""
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        raise InputError(
            f"checkpoint {folder} has no fingerprint, so it cannot be shown to belong to this "
            "run; use another output, --resume never, or --resume force"
        )
    key = first_difference(saved, current)
    if key is None:
        return
    was, now = _short(saved.get(key)), _short(current[key])
    raise InputError(
        f"checkpoint {folder} belongs to another run: '{key}' was {was}, now {now}; "
        "use another output, --resume never to start afresh, or --resume force"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
