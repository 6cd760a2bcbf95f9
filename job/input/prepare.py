"""``finetune-job prepare``: an image folder → RecordIO shards + ``manifest.json``.

Layout written under DEST (local or ``s3://``)::

    train/part-00000.rec  train/part-00000.idx  ...
    val/part-00000.rec    val/part-00000.idx    ...
    train/files.txt       the split's image files (relative to SRC), line i = record id i
    val/files.txt
    manifest.json         classes, counts, shards with bytes, record count and sha256

A live dataset is never changed in place: ``prepare`` refuses a destination that holds
anything, unless ``--overwrite``. That writes a new version's shards under new names
(``train/part-<version>-00000.rec``) beside the old ones and replaces the manifest last, so
a reader sees the old dataset or the new one, never a mix; an interrupted overwrite leaves
the old dataset as it was. The shards of the version before the one replaced (and of
interrupted overwrites) are deleted then; the replaced version's stay for runs still
reading it.

Images are resized so the shorter side is ``resize`` (small images are enlarged; nothing is
cropped) and re-encoded as JPEG, in parallel over the cores. The train/val split is
deterministic for a seed. An unreadable image file is skipped and named in the log. So is
an image whose header claims more than ``max_pixels`` pixels (50 MP by default): it is never
decoded, so a decompression bomb cannot take the machine's memory.
Progress (images/s, ETA) is redrawn in place on a terminal and logged every 30 s otherwise;
the last line gives every class's train/val counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import cv2
import imagesize

from job import storage as st
from job.errors import InputError
from job.input.augment import resize_shorter
from job.input.shards import ShardWriter, verify_dataset
from job.storage import Storage
from job.training.progress import CountProgress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_PIXELS = 50_000_000
MANIFEST = "manifest.json"
FILES_STEM = "files"  # <split>/files.txt, or files-<version>.txt after an overwrite
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Item:
    path: str
    label: int


def list_images(src: str) -> tuple[list[str], list[Item]]:
    """Class names (sorted folder names) and every image below them."""
    if not os.path.isdir(src):
        raise InputError(f"prepare: {src} is not a folder of class folders")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if len(classes) < 2:
        raise InputError(f"prepare: {src} needs at least 2 class folders, found {len(classes)}")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(src, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise InputError(f"prepare: class folder {folder} has no images")
        items += [Item(os.path.join(folder, f), label) for f in files]
    return classes, items


def split(items: list[Item], val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """Per class, a seeded share for validation (at least one image when the share is > 0)."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"prepare: --val-fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    out: dict[str, list[Item]] = {"train": [], "val": []}
    for label in sorted({i.label for i in items}):
        members = [i for i in items if i.label == label]
        rng.shuffle(members)
        n_val = min(len(members) - 1, math.ceil(len(members) * val_fraction))
        out["val"] += members[:n_val]
        out["train"] += members[n_val:]
    rng.shuffle(out["train"])  # shards mix classes
    return out


@dataclass(frozen=True)
class Skip:
    """Why an image file is left out."""

    reason: str
    too_large: bool = False


# libjpeg-turbo scales a JPEG by 1/2, 1/4 or 1/8 while decoding it (in the DCT): far less
# work than decoding every pixel of a 3000x2000 photo to shrink it to 256 right after.
REDUCED: tuple[tuple[int, int], ...] = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def reduced_decode_flag(path: str, shorter: int, resize: int) -> int:
    """The imread flag for a file whose shorter side is ``shorter`` pixels: the largest JPEG
    decode-time reduction that keeps the shorter side at least ``resize`` (the area resize
    after it does the rest), else a full decode."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":  # only JPEGs scale while decoding
            return cv2.IMREAD_COLOR
    for factor, flag in REDUCED:
        if shorter // factor >= resize:
            return flag
    return cv2.IMREAD_COLOR


def encode(job: tuple[str, int, int, int]) -> bytes | Skip:
    """The image as a resized JPEG, or why it is skipped. The size comes from the file's
    header first: an image over ``max_pixels`` is never decoded."""
    path, resize, quality, max_pixels = job
    width, height = imagesize.get(path)
    if width <= 0 or height <= 0:
        return Skip("not a readable image (no image size in its header)")
    if width * height > max_pixels:
        return Skip(f"{width}x{height} pixels is over --max-pixels {max_pixels}", too_large=True)
    img = cv2.imread(path, reduced_decode_flag(path, min(width, height), resize))
    if img is None:
        return Skip("not a readable image")
    ok, buf = cv2.imencode(
        ".jpg",
        resize_shorter(img, resize, enlarge=cv2.INTER_CUBIC),
        [cv2.IMWRITE_JPEG_QUALITY, quality],
    )
    return buf.tobytes() if ok else Skip("cannot be encoded as JPEG")


def prepare(
    src: str,
    dest: str,
    storage: Storage,
    *,
    resize: int = 256,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    quality: int = 95,
    workers: int = 0,
    seed: int = 0,
    verify: bool = False,
    max_pixels: int = MAX_PIXELS,
    overwrite: bool = False,
    progress_stream: IO[str] | None = None,
) -> dict:
    if resize < 16 or shard_size < 1 or not 1 <= quality <= 100 or max_pixels < 1:
        raise InputError(
            "prepare: --resize must be >= 16, --shard-size >= 1, --quality 1..100, "
            "--max-pixels >= 1"
        )
    classes, items = list_images(src)
    splits = split(items, val_fraction, seed)
    storage.check_bucket(dest)  # fail now, not after encoding the first shard
    existing = storage.list(dest)
    if existing and not overwrite:
        raise InputError(
            f"prepare: {dest} is not empty ({len(existing)} files, e.g. {existing[0]}); a "
            "dataset is never changed in place: pass --overwrite to write a new version "
            "beside it (the manifest is replaced last)"
        )
    previous = _previous_shards(dest, storage) if existing else set()
    # A new version's shards get names no reader of the old manifest can be using.
    version = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}{secrets.token_hex(2)}"
    prefix = f"part-{version}-" if existing else "part-"
    suffix = f"-{version}" if existing else ""
    manifest: dict = {
        "version": 1,
        "classes": classes,
        "resize": resize,
        "quality": quality,
        "splits": {},
        "skipped_files": [],
        "skipped_over_max_pixels": 0,
        "max_pixels": max_pixels,
    }
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("fork")
    stream = progress_stream or sys.stderr
    progress = CountProgress(len(items), "images", stream, lambda t: log.info("prepare: %s", t))
    window = _Window(WINDOW_CHUNKS_PER_WORKER * workers, CHUNK)
    with ctx.Pool(workers) as pool, contextlib.closing(window):
        # Both splits are queued at once: the workers go on to the validation images while
        # the last training shard is written, instead of waiting for it.
        encoded = {
            name: pool.imap(
                encode,
                window.feed((i.path, resize, quality, max_pixels) for i in splits[name]),
                chunksize=CHUNK,
            )
            for name in SPLITS
        }
        for name in SPLITS:
            shards, skipped, files = _write_split(
                name,
                splits[name],
                window.results(encoded[name]),
                ShardWriter(name, dest, storage, prefix),
                shard_size,
                progress,
            )
            # A record's header id is a line of this file: evaluation names images by it.
            # A file of its own, so the manifest every rank reads stays small; versioned
            # like the shards, so an overwrite never changes what an older manifest names.
            listing = "".join(os.path.relpath(f, src) + "\n" for f in files)
            files_name = f"{name}/{FILES_STEM}{suffix}.txt"
            storage.write_bytes(st.join(dest, files_name), listing.encode())
            manifest["splits"][name] = {
                "count": sum(s["count"] for s in shards),
                "shards": shards,
                "files": files_name,
            }
            for path, skip in skipped:
                log.warning("prepare: skipped %s: %s", path, skip.reason)
                manifest["skipped_files"].append(path)
                manifest["skipped_over_max_pixels"] += skip.too_large
    progress.finish()
    if verify:
        verify_dataset(dest, manifest, storage)
    # The manifest goes last: a reader never sees a half-written dataset.
    storage.write_bytes(st.join(dest, MANIFEST), json.dumps(manifest, indent=1).encode())
    if existing:
        _delete_unreferenced(dest, storage, previous | _shard_files(manifest))
    log.info(
        "prepare: %s → %s: %d classes, %d train / %d val images in %d shards; "
        "%d files skipped, %d of them over --max-pixels %d",
        src,
        dest,
        len(classes),
        manifest["splits"]["train"]["count"],
        manifest["splits"]["val"]["count"],
        sum(len(s["shards"]) for s in manifest["splits"].values()),
        len(manifest["skipped_files"]),
        manifest["skipped_over_max_pixels"],
        max_pixels,
    )
    log.info("prepare: images per class: %s", class_counts(classes, splits, manifest))
    return manifest


def class_counts(classes: list[str], splits: dict[str, list[Item]], manifest: dict) -> str:
    """``cat 40 train / 8 val, dog ...``: what each class holds once skipped files are out."""
    skipped = set(manifest["skipped_files"])
    parts = []
    for label, name in enumerate(classes):
        counts = [
            sum(1 for i in splits[s] if i.label == label and i.path not in skipped) for s in SPLITS
        ]
        parts.append(f"{name} {counts[0]} train / {counts[1]} val")
    return ", ".join(parts)


def _shard_files(manifest: dict) -> set[str]:
    """The .rec/.idx paths and file listings (relative to the dataset root) a manifest
    refers to."""
    splits = manifest["splits"].values()
    listings = {split_["files"] for split_ in splits if "files" in split_}
    return listings | {
        shard[kind] for split_ in splits for shard in split_["shards"] for kind in ("rec", "idx")
    }


def _previous_shards(dest: str, storage: Storage) -> set[str]:
    """The shard files of the manifest about to be replaced (none if there is no valid one)."""
    uri = st.join(dest, MANIFEST)
    if not storage.exists(uri):
        return set()
    try:
        return _shard_files(json.loads(storage.read_bytes(uri)))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("prepare: %s is not a valid manifest; replacing it", uri)
        return set()


def _delete_unreferenced(dest: str, storage: Storage, keep: set[str]) -> None:
    """Delete shard files under the split folders that neither the new nor the replaced
    manifest names: older versions and interrupted overwrites."""
    for name in SPLITS:
        for uri in storage.list(st.join(dest, name)):
            rel = name + "/" + uri[len(st.join(dest, name)) :].strip("/")
            if rel.endswith((".rec", ".idx", ".txt")) and rel not in keep:
                storage.delete(uri)


# Images a worker takes at a time, and how many such chunks a worker may be ahead of the
# writer.
CHUNK = 8
WINDOW_CHUNKS_PER_WORKER = 8


class _Window:
    """Lets the pool's workers run at most ``chunks`` chunks of images ahead of the writer,
    so encoded images waiting for a slow upload never pile up in memory. ``Pool.imap`` pulls
    its jobs from :meth:`feed` in its own thread and sends them in chunks of ``chunk``
    consecutive jobs; :meth:`results` hands a chunk's slot back once the writer has taken
    the chunk's results. (A slot per chunk, not per image: the pool sends a chunk only once
    it has all its jobs, and a semaphore per image costs the writer's process real time.)"""

    def __init__(self, chunks: int, chunk: int) -> None:
        self._slots = threading.Semaphore(chunks)
        self._chunk = chunk
        self._open = True

    def feed(self, jobs: Iterable[Any]) -> Iterator[Any]:
        for i, job in enumerate(jobs):
            if i % self._chunk == 0:
                if not self._open:
                    return
                self._slots.acquire()
                if not self._open:  # woken by close()
                    return
            yield job

    def results(self, encoded: Iterable[Any]) -> Iterator[Any]:
        taken = 0
        for taken, result in enumerate(encoded, 1):
            if taken % self._chunk == 0:
                self._slots.release()
            yield result
        if taken % self._chunk:  # the last chunk is short
            self._slots.release()

    def close(self) -> None:
        """Unblock :meth:`feed` for good, so the pool can shut down after an error."""
        self._open = False
        self._slots.release()


def _write_split(
    name: str,
    items: list[Item],
    encoded,
    writer: ShardWriter,
    shard_size: int,
    progress: CountProgress,
) -> tuple[list[dict], list[tuple[str, Skip]], list[str]]:
    """Pack one split's encoded images into shards; returns (shards, skipped files, written
    files in record-id order)."""
    skipped: list[tuple[str, Skip]] = []
    written: list[str] = []
    try:
        for item, jpeg in zip(items, encoded, strict=True):
            progress.advance()
            if isinstance(jpeg, Skip):
                skipped.append((item.path, jpeg))
                continue
            writer.add(item.label, jpeg, len(written))
            written.append(item.path)
            if writer.count == shard_size:
                writer.finish()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.shards, skipped, written
