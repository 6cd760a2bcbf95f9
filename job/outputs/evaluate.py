"""``finetune-job evaluate``: accuracy of a run's exported model on a dataset split.

Loads ``OUTPUT/model-symbol.json`` + ``model-0000.params`` (the serving artefacts) as a
``SymbolBlock``, so what is measured is exactly what gets deployed. ``evaluate_net`` is also
what the end of training runs to write ``eval.json`` (see ``job.outputs.evaluation``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from job import layout
from job import storage as st
from job.errors import InputError
from job.input.data import (
    Batch,
    Dataset,
    DataStats,
    Loader,
    LoaderSettings,
    load_dataset,
    to_ndarray,
)
from job.outputs import evaluation
from job.storage import Storage, StorageError


def load_export(
    model_dir: str, storage: Storage, ctx: mx.Context
) -> tuple[gluon.SymbolBlock, dict]:
    try:
        summary = layout.read_summary(storage, model_dir)
        with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
            paths = []
            for name in (layout.SYMBOL, layout.EXPORT_PARAMS):
                paths.append(os.path.join(tmp, name))
                storage.download(st.join(model_dir, name), paths[-1])
            with warnings.catch_warnings():  # "Cannot decide type for ... data": it is float32
                warnings.simplefilter("ignore", UserWarning)
                net = gluon.SymbolBlock.imports(paths[0], ["data"], paths[1], ctx=ctx)
    except StorageError as e:
        raise InputError(f"--model {model_dir}: not a finished training run ({e})") from e
    return net, summary


def count_correct(
    net: Any, batches: Iterable[Batch], ctx: mx.Context
) -> tuple[float, float, float]:
    """Top-1 hits of the center crops, of the five-crop mean softmax (when the batches carry
    five crops), and the number of images."""
    correct = correct_tta = count = 0.0
    for batch in batches:
        n, label = batch.valid, batch.label[: batch.valid]
        out = net(to_ndarray(batch.data, ctx)).asnumpy()[:n]
        correct += float((out.argmax(1) == label).sum())
        if batch.five is not None:
            five = to_ndarray(batch.five.reshape(-1, *batch.five.shape[2:]), ctx)
            prob = mx.nd.softmax(net(five)).asnumpy().reshape(len(batch.label), 5, -1)
            correct_tta += float((prob[:n].mean(axis=1).argmax(1) == label).sum())
        count += n
    return correct, correct_tta, count


@dataclass
class Predictions:
    prob: np.ndarray  # (N, classes) softmax of the center crop
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) record ids
    prob_tta: np.ndarray | None = None  # mean softmax of five crops
    images: np.ndarray | None = None  # the first center crops (NCHW), when asked for


def collect(
    net: Any,
    batches: Iterable[Batch],
    ctx: mx.Context,
    keep_images: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> Predictions:
    """Softmax rows, labels and record ids of every image of ``batches``; ``on_batch`` is
    called after each (the training run's watchdog counts it as progress)."""
    probs, probs_tta, labels, ids, kept = [], [], [], [], []
    held = 0
    for batch in batches:
        n = batch.valid
        probs.append(mx.nd.softmax(net(to_ndarray(batch.data, ctx))).asnumpy()[:n])
        labels.append(batch.label[:n].astype(np.int64))
        ids.append(batch.ids[:n].copy() if batch.ids is not None else np.full(n, -1))
        if held < keep_images:
            kept.append(batch.data[: min(n, keep_images - held)].copy())
            held += len(kept[-1])
        if batch.five is not None:
            five = to_ndarray(batch.five.reshape(-1, *batch.five.shape[2:]), ctx)
            prob = mx.nd.softmax(net(five)).asnumpy().reshape(len(batch.label), 5, -1)
            probs_tta.append(prob[:n].mean(axis=1))
        if on_batch is not None:
            on_batch()
    if not probs:
        raise InputError("no images could be evaluated")
    return Predictions(
        np.concatenate(probs),
        np.concatenate(labels),
        np.concatenate(ids),
        np.concatenate(probs_tta) if probs_tta else None,
        np.concatenate(kept) if kept else None,
    )


def image_names(dataset: Dataset, split: str, storage: Storage, ids: np.ndarray) -> list[str]:
    """What each record id stands for: the image path that ``prepare`` stored in the
    manifest, or ``split#id`` for datasets prepared before it did."""
    doc = json.loads(storage.read_bytes(st.join(dataset.root, "manifest.json")))
    listing = doc["splits"][split].get("files")
    files = []
    if isinstance(listing, str):
        files = storage.read_bytes(st.join(dataset.root, listing)).decode().splitlines()
    return [files[i] if 0 <= i < len(files) else f"{split}#{i}" for i in ids.tolist()]


def evaluate_net(
    net: Any,
    dataset: Dataset,
    split: str,
    storage: Storage,
    ctx: mx.Context,
    image_size: int,
    *,
    tta: bool = False,
    batch_size: int = 64,
    worst: int = 16,
    keep_images: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], Predictions]:
    """The eval.json document of ``net`` on a whole split, read by this one process."""
    settings = LoaderSettings(
        batch_size=batch_size, image_size=image_size, tta=tta, workers=os.cpu_count() or 1
    )
    loader = Loader(dataset, split, settings, 0, 1, storage, DataStats(), train=False)
    try:
        pred = collect(net, loader.epoch(0), ctx, keep_images, on_batch)
    finally:
        loader.close()
    names = image_names(dataset, split, storage, pred.ids)
    doc = {
        "split": split,
        **evaluation.summarize(pred.prob, pred.labels, names, dataset.classes, worst),
    }
    records = dict(zip(names, pred.ids.tolist(), strict=True))
    for row in doc["worst_mistakes"]:
        row["record"] = records[row["id"]]  # read_images takes it back to the image bytes
    if pred.prob_tta is not None:
        doc["top1_tta"] = round(float((pred.prob_tta.argmax(1) == pred.labels).mean()), 6)
    return doc, pred


def evaluate_export(
    data: str,
    model_dir: str,
    storage: Storage,
    split: str = "val",
    tta: bool = False,
    batch_size: int = 64,
    worst: int = 16,
) -> dict[str, Any]:
    """The eval.json document of a finished run's exported model on ``data``'s ``split``."""
    ctx = mx.gpu(0) if mx.context.num_gpus() else mx.cpu()
    net, summary = load_export(model_dir, storage, ctx)
    dataset = load_dataset(data, storage)
    if dataset.classes != summary["classes"]:
        raise InputError(
            f"--data {data}: classes {dataset.classes} differ from the model's {summary['classes']}"
        )
    if not dataset.count(split):
        raise InputError(f"--data {data}: the {split} split is empty")
    doc, _ = evaluate_net(
        net,
        dataset,
        split,
        storage,
        ctx,
        summary["config"]["image_size"],
        tta=tta,
        batch_size=batch_size,
        worst=worst,
    )
    return doc


def read_images(
    dataset: Dataset, split: str, storage: Storage, ids: Iterable[int]
) -> dict[int, bytes]:
    """The encoded images of records ``ids`` (one ranged read each), for thumbnails.

    Ids number a split's records in shard order (``prepare`` writes them so), so an id is a
    shard and a position in its ``.idx`` file.
    """
    from mxnet import recordio

    from job.input.records import RecordStream, read_index

    wanted = sorted(set(int(i) for i in ids if int(i) >= 0))
    found: dict[int, bytes] = {}
    first = 0
    for shard in dataset.splits[split]:
        inside = [i for i in wanted if first <= i < first + shard.count]
        if inside:
            offsets = read_index(storage.read_bytes(shard.idx_uri).decode())
            for i in inside:
                start = offsets[i - first]
                with storage.open_read(shard.uri, start) as fh:
                    record = next(iter(RecordStream(shard.uri, fh)), None)  # type: ignore[arg-type]
                if record is not None:
                    header, jpeg = recordio.unpack(record.payload)
                    if int(header.id) == i:  # a dataset from before ids: no thumbnail
                        found[i] = jpeg
        first += shard.count
    return found
