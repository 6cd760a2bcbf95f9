"""The dataset's manifest.json as a model, and each rank's share of the shards."""

from __future__ import annotations

import json
import logging
import posixpath
import random
from dataclasses import dataclass
from typing import Any, TypeGuard

from job import storage as st
from job.errors import InputError
from job.storage import Storage, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    uri: str
    idx_uri: str
    count: int
    sha256: str = ""
    size: int = -1  # bytes of the .rec, from the manifest (-1: an older manifest, unchecked)


@dataclass(frozen=True)
class Piece:
    """Records [start, stop) of one shard."""

    shard: Shard
    start: int
    stop: int


@dataclass(frozen=True)
class Dataset:
    root: str
    classes: list[str]
    resize: int
    splits: dict[str, list[Shard]]

    def count(self, split: str) -> int:
        return sum(s.count for s in self.splits[split])


def load_dataset(root: str, storage: Storage) -> Dataset:
    uri = st.join(root, "manifest.json")
    try:
        if not storage.exists(uri):
            storage.check_bucket(uri)  # a missing bucket is named as such
            raise InputError(f"{uri}: no dataset manifest (run `finetune-job prepare` first)")
        doc = json.loads(storage.read_bytes(uri))
    except StorageError as e:
        raise InputError(str(e)) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{uri}: not a dataset manifest (not JSON: {e})") from e
    dataset = parse_manifest(doc, root, uri)
    if not dataset.count("train"):
        raise InputError(f"{uri}: the dataset has no training images")
    return dataset


def parse_manifest(doc: Any, root: str, uri: str) -> Dataset:
    """The Dataset a manifest describes; anything that would misbehave later (a shard path
    outside the dataset root, a count that is not a whole number, ...) is an InputError
    naming the manifest and the entry."""

    def bad(what: str) -> InputError:
        return InputError(f"{uri}: not a valid dataset manifest: {what}")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    classes = doc.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad(f"'classes' must list 2 or more distinct names, got {classes!r:.200}")
    resize = doc.get("resize")
    if not _whole(resize) or resize < 1:
        raise bad(f"'resize' must be a positive integer, got {resize!r}")
    splits_doc = doc.get("splits")
    if not isinstance(splits_doc, dict) or "train" not in splits_doc:
        raise bad("'splits' must hold at least 'train'")
    splits = {name: _shards(split, name, root, bad) for name, split in splits_doc.items()}
    splits.setdefault("val", [])
    return Dataset(root, list(classes), int(resize), splits)


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shards(split: Any, name: str, root: str, bad: Any) -> list[Shard]:
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        raise bad(f"split '{name}' has no list of shards")
    shards = []
    for i, s in enumerate(split["shards"]):
        where = f"split '{name}' shard {i}"
        if not isinstance(s, dict):
            raise bad(f"{where} is not an object")
        count = s.get("count")
        if not _whole(count) or count < 0:
            raise bad(f"{where}: 'count' must be a whole number >= 0, got {count!r}")
        sha = s.get("sha256", "")
        if not isinstance(sha, str):
            raise bad(f"{where}: 'sha256' must be a string, got {sha!r}")
        size = s.get("bytes", -1)  # absent in manifests written before sizes were recorded
        if not _whole(size) or size < -1:
            raise bad(f"{where}: 'bytes' must be a whole number >= 0, got {size!r}")
        paths = [_inside(root, s.get(key), f"{where} '{key}'", bad) for key in ("rec", "idx")]
        shards.append(Shard(paths[0], paths[1], count, sha, size))
    return shards


def _inside(root: str, rel: Any, where: str, bad: Any) -> str:
    """``root``/``rel``, where rel must stay inside the dataset root: a relative path with
    no '..' part, no scheme and no control characters."""
    ok = (
        isinstance(rel, str)
        and rel
        and not rel.startswith(("/", "\\"))
        and "://" not in rel
        and ".." not in posixpath.normpath(rel).split("/")
        and not any(ord(ch) < 32 or ord(ch) == 127 for ch in rel)
    )
    if not ok:
        raise bad(f"{where} must be a path inside the dataset root, got {rel!r:.200}")
    return st.join(root, rel)


def assign_shards(
    shards: list[Shard], rank: int, size: int, epoch: int, seed: int, shuffle: bool = True
) -> list[Piece]:
    """This rank's disjoint share of the records.

    The shards, in an order shuffled by (seed, epoch), are laid end to end and cut into
    ``size`` runs whose lengths differ by at most one record; rank r takes run r. Shards are
    cut only where a run ends, so most pieces are whole shards, and more ranks than shards
    still get balanced shares.
    """
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    total = sum(s.count for s in order)
    lo, hi = rank * total // size, (rank + 1) * total // size
    pieces, first = [], 0
    for shard in order:
        start, stop = max(lo, first), min(hi, first + shard.count)
        if start < stop:
            pieces.append(Piece(shard, start - first, stop - first))
        first += shard.count
    return pieces
