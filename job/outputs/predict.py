"""``finetune-job predict``: batch predictions of a run's exported model.

Sources: an image file, a folder (recursive), a dataset root written by ``prepare`` (its
``--split``), or an ``s3://`` prefix holding any of these. Every image gets the evaluation
transform (shorter side to image_size/0.875, center crop; ``--tta``: mean softmax of five
crops) and goes through the model in batches, with the MXNet export (``--engine mxnet``) or
``model.onnx`` (``--engine onnx``). Prepared datasets are read with the same loader that
``evaluate`` uses, so on them both commands see the same pixels and agree on top-1.

Output: JSONL, one line per image, ``{"uri": ..., "top": [{"label", "index", "prob"}, ...]}``
sorted by probability; an unreadable image gets ``{"uri": ..., "error": ...}``. ``--format
csv`` writes one row per image. With ``--output`` (local or ``s3://``) the file appears only
once it is complete.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from job import layout
from job import storage as st
from job.errors import InputError
from job.input import augment
from job.input.prepare import IMAGE_SUFFIXES
from job.storage import Storage, StorageError


@dataclass
class Item:
    """One image's result: its probabilities, or why it has none."""

    uri: str
    prob: np.ndarray | None = None
    error: str | None = None


Engine = Callable[[np.ndarray], np.ndarray]  # NCHW float32 → softmax rows


def mxnet_engine(model_dir: str, storage: Storage) -> tuple[Engine, dict[str, Any]]:
    import mxnet as mx

    from job.outputs.evaluate import load_export

    ctx = mx.gpu(0) if mx.context.num_gpus() else mx.cpu()
    net, summary = load_export(model_dir, storage, ctx)

    def run(x: np.ndarray) -> np.ndarray:
        return mx.nd.softmax(net(mx.nd.array(x, ctx=ctx))).asnumpy()

    return run, summary


def onnx_engine(model_dir: str, storage: Storage) -> tuple[Engine, dict[str, Any]]:
    from job.outputs import onnx_export as ox

    uri = st.join(model_dir, layout.ONNX)
    try:
        summary = layout.read_summary(storage, model_dir)
        with storage.local_copy(uri) as path:
            sess = ox.session(path)
    except StorageError as e:
        raise InputError(
            f"--model {model_dir}: no ONNX model ({e}); `finetune-job export --onnx` makes one"
        ) from e

    def run(x: np.ndarray) -> np.ndarray:
        logits = sess.run([ox.OUTPUT], {ox.INPUT: np.ascontiguousarray(x)})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return run, summary


def list_sources(sources: list[str], storage: Storage) -> list[tuple[str, str]]:
    """(kind, uri) pairs: ``dataset`` roots, then single ``image`` files, in order given."""
    found: list[tuple[str, str]] = []
    for src in sources:
        if storage.exists(st.join(src, "manifest.json")):
            found.append(("dataset", src))
        elif src.lower().endswith(IMAGE_SUFFIXES) and storage.exists(src):
            found.append(("image", src))
        else:
            listed = [u for u in _list(src, storage) if u.lower().endswith(IMAGE_SUFFIXES)]
            if not listed:
                raise InputError(f"predict: {src}: no images, folder or dataset found there")
            found += [("image", u) for u in listed]
    return found


def _list(src: str, storage: Storage) -> list[str]:
    if not st.is_s3(src) and not os.path.isdir(src):
        return []
    return storage.list(src)


def _transform(data: bytes, size: int, tta: bool) -> tuple[np.ndarray, np.ndarray | None]:
    img = augment.decode(data)
    if img is None:
        raise ValueError("not a readable image")
    out = np.empty((3, size, size), np.float32)
    five = np.empty((5, 3, size, size), np.float32) if tta else None
    augment.eval_sample(img, size, out, five)
    return out, five


def _image_items(
    uris: list[str], engine: Engine, storage: Storage, size: int, tta: bool, batch: int
) -> Iterator[Item]:
    """Read and transform in threads (cv2 and S3 reads release the GIL), predict in batches;
    the next batch is read and decoded while the engine runs this one."""

    def load(uri: str) -> tuple[str, Any]:
        try:
            return uri, _transform(storage.read_bytes(uri), size, tta)
        except (StorageError, ValueError) as e:
            return uri, str(e)

    chunks = [uris[i : i + batch] for i in range(0, len(uris), batch)]
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="finetune-predict") as pool:
        ahead = [pool.submit(load, u) for u in chunks[0]] if chunks else []
        for i in range(len(chunks)):
            loaded = [f.result() for f in ahead]
            ahead = [pool.submit(load, u) for u in chunks[i + 1]] if i + 1 < len(chunks) else []
            good = [(u, x) for u, x in loaded if not isinstance(x, str)]
            probs: Any = _predict([x for _, x in good], engine) if good else []
            by_uri = {u: p for (u, _), p in zip(good, probs, strict=True)}
            for uri, x in loaded:
                yield Item(uri, error=x) if isinstance(x, str) else Item(uri, by_uri[uri])


def _predict(inputs: list[tuple[np.ndarray, np.ndarray | None]], engine: Engine) -> np.ndarray:
    if inputs[0][1] is None:
        return engine(np.stack([x for x, _ in inputs]))
    five = np.stack([f for _, f in inputs if f is not None])  # (B, 5, 3, S, S)
    prob = engine(five.reshape(-1, *five.shape[2:]))
    return prob.reshape(len(inputs), 5, -1).mean(axis=1)


def _dataset_items(
    root: str, split: str, engine: Engine, storage: Storage, size: int, tta: bool, batch: int
) -> Iterator[Item]:
    """A prepared dataset's split, through evaluate's own loader (same pixels as evaluate)."""
    from job.input.data import DataStats, Loader, LoaderSettings, load_dataset
    from job.outputs.evaluate import image_names

    dataset = load_dataset(root, storage)
    if not dataset.count(split):
        raise InputError(f"predict: {root}: the {split} split is empty")
    settings = LoaderSettings(
        batch_size=batch, image_size=size, tta=tta, workers=os.cpu_count() or 1
    )
    loader = Loader(dataset, split, settings, 0, 1, storage, DataStats(), train=False)
    try:
        for b in loader.epoch(0):
            n = b.valid
            if b.five is not None:
                five = b.five[:n]
                prob = engine(five.reshape(-1, *five.shape[2:])).reshape(n, 5, -1).mean(1)
            else:
                prob = engine(b.data[:n])
            assert b.ids is not None
            names = image_names(dataset, split, storage, b.ids[:n])
            for name, p in zip(names, prob, strict=True):
                yield Item(f"{root}#{split}/{name}", p)
    finally:
        loader.close()


def top(prob: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-prob, kind="stable")[:k]
    return [{"label": classes[i], "index": int(i), "prob": round(float(prob[i]), 6)} for i in order]


class _Writer:
    def __init__(self, fh: IO[str], fmt: str, k: int) -> None:
        self.fh, self.fmt = fh, fmt
        self.csv: Any = None
        if fmt == "csv":
            self.csv = csv.writer(fh, lineterminator="\n")
            cols = [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "index", "prob")]
            self.csv.writerow(["uri", *cols, "error"])

    def write(self, item: Item, classes: list[str], k: int) -> None:
        if self.fmt == "jsonl":
            row: dict[str, Any] = {"uri": item.uri}
            if item.prob is None:
                row["error"] = item.error
            else:
                row["top"] = top(item.prob, classes, k)
            self.fh.write(json.dumps(row) + "\n")
            return
        cells: list[Any] = []
        if item.prob is not None:
            for t in top(item.prob, classes, k):
                cells += [t["label"], t["index"], t["prob"]]
        cells += [""] * (3 * k - len(cells))
        self.csv.writerow([item.uri, *cells, item.error or ""])


def predict(
    model_dir: str,
    sources: list[str],
    storage: Storage,
    *,
    output: str | None = None,
    fmt: str = "jsonl",
    top_k: int = 5,
    engine: str = "mxnet",
    tta: bool = False,
    batch_size: int = 32,
    split: str = "val",
    progress: IO[str] | None = None,
) -> int:
    """Predict every image of ``sources``; returns the number of images written."""
    if top_k < 1 or batch_size < 1:
        raise InputError("predict: --top-k and --batch-size must be at least 1")
    run, summary = (onnx_engine if engine == "onnx" else mxnet_engine)(model_dir, storage)
    classes, size = summary["classes"], int(summary["config"]["image_size"])
    k = min(top_k, len(classes))
    found = list_sources(sources, storage)
    images = [u for kind, u in found if kind == "image"]
    streams = [
        _dataset_items(u, split, run, storage, size, tta, batch_size)
        for kind, u in found
        if kind == "dataset"
    ]
    if images:
        streams.append(_image_items(images, run, storage, size, tta, batch_size))
    with tempfile.TemporaryDirectory(prefix="finetune-predict-") as tmp:
        path = os.path.join(tmp, "predictions")
        with open(path, "w", encoding="utf-8") if output else nullcontext(sys.stdout) as fh:
            writer, count = _Writer(fh, fmt, k), 0
            for stream in streams:
                for item in stream:
                    writer.write(item, classes, k)
                    count += 1
                    if progress is not None and count % batch_size == 0:
                        progress.write(f"\rpredict: {count} images")
        if progress is not None:
            progress.write(f"\rpredict: {count} images\n")
        if output:  # one upload (or rename) of the finished file
            storage.upload(path, output)
    return count
