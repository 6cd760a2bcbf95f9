"""``finetune-job evaluate``: accuracy of a run's exported model on a dataset split.

Loads ``OUTPUT/model-symbol.json`` + ``model-0000.params`` (the serving artefacts) as a
``SymbolBlock``, so what is measured is exactly what gets deployed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

import mxnet as mx
from mxnet import gluon

from job import storage as st
from job.data import Batch, DataStats, Loader, LoaderSettings, load_dataset, to_ndarray
from job.errors import InputError
from job.storage import Storage, StorageError


def load_export(
    model_dir: str, storage: Storage, ctx: mx.Context
) -> tuple[gluon.SymbolBlock, dict]:
    try:
        summary = json.loads(storage.read_bytes(st.join(model_dir, "summary.json")))
        with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
            paths = []
            for name in ("model-symbol.json", "model-0000.params"):
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


def evaluate_export(
    data: str,
    model_dir: str,
    storage: Storage,
    split: str = "val",
    tta: bool = False,
    batch_size: int = 64,
) -> dict[str, float | int]:
    ctx = mx.gpu(0) if mx.context.num_gpus() else mx.cpu()
    net, summary = load_export(model_dir, storage, ctx)
    dataset = load_dataset(data, storage)
    if dataset.classes != summary["classes"]:
        raise InputError(
            f"--data {data}: classes {dataset.classes} differ from the model's {summary['classes']}"
        )
    if not dataset.count(split):
        raise InputError(f"--data {data}: the {split} split is empty")
    settings = LoaderSettings(
        batch_size=batch_size,
        image_size=summary["config"]["image_size"],
        tta=tta,
        workers=os.cpu_count() or 1,
    )
    loader = Loader(dataset, split, settings, 0, 1, storage, DataStats(), train=False)
    try:
        correct, correct_tta, count = count_correct(net, loader.epoch(0), ctx)
    finally:
        loader.close()
    result: dict[str, float | int] = {"split_images": int(count), "top1": correct / count}
    if tta:
        result["top1_tta"] = correct_tta / count
    return result
