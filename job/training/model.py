"""The network: a model-zoo ResNet whose ``features`` come from pretrained weights and whose
new ``output`` layer is sized to the target classes.

Fine-tuning as usual in Gluon: build the source network (ImageNet's 1000 classes for
``zoo``, or as many classes as the given file's output layer has), load its weights, then
take its ``features`` into a fresh network with ``classes=N``. The new output layer is
Xavier-initialised and learns at ``head_lr_mult`` times the base rate.
"""

from __future__ import annotations

import logging
import os

import mxnet as mx
from mxnet import gluon
from mxnet.gluon.model_zoo import vision

from job.config import Config
from job.errors import InputError
from job.outputs.registry import resolve_pretrained
from job.storage import Storage, StorageError

log = logging.getLogger(__name__)
NO_WEIGHT_DECAY = (".*beta", ".*gamma", ".*bias", ".*running_mean", ".*running_var")


def build(cfg: Config, classes: int, ctx: mx.Context, storage: Storage) -> gluon.HybridBlock:
    net = vision.get_model(cfg.model, classes=classes)
    source = load_source(cfg, ctx, storage)
    if source is not None:
        net.features = source.features
    else:
        net.features.initialize(
            mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx
        )
    net.output.initialize(mx.init.Xavier(), ctx=ctx)
    net.output.collect_params().setattr("lr_mult", cfg.head_lr_mult)
    if cfg.freeze_features:
        net.features.collect_params().setattr("grad_req", "null")
    for pattern in NO_WEIGHT_DECAY:
        net.collect_params(pattern).setattr("wd_mult", 0.0)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def load_source(cfg: Config, ctx: mx.Context, storage: Storage) -> gluon.HybridBlock | None:
    """The pretrained network, or None for ``--pretrained none``."""
    if cfg.pretrained == "none":
        return None
    if cfg.pretrained == "zoo":
        return _from_zoo(cfg.model, ctx)
    # <root>/latest of scheduled retraining resolves to the model it points at.
    return load_params_file(cfg.model, resolve_pretrained(cfg.pretrained, storage), ctx, storage)


def _from_zoo(name: str, ctx: mx.Context) -> gluon.HybridBlock:
    try:
        return vision.get_model(name, pretrained=True, ctx=ctx)
    except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(
            f"--pretrained zoo: cannot load the model zoo's {name} weights ({reason[:200]}); "
            "put them in $MXNET_HOME/models, or use --pretrained PATH (a save_parameters file, "
            "local or s3://) or --pretrained none"
        ) from e


def load_params_file(name: str, uri: str, ctx: mx.Context, storage: Storage) -> gluon.HybridBlock:
    """A ``save_parameters`` file of ``name`` (zoo files and this job's model.params are).

    Each way a file can be wrong is one line: not a parameters file at all (text, empty,
    truncated), not a ResNet's, or another architecture's (parameter names differ).
    """
    try:
        with storage.local_copy(uri) as path:
            arrays = _read_arrays(path, uri)
            source = vision.get_model(name, classes=_output_classes(arrays, uri))
            _check_names(source, arrays, name, uri)
            source.load_parameters(path, ctx=ctx)
    except StorageError as e:
        raise InputError(f"--pretrained {uri}: {e}") from e
    except (AssertionError, mx.MXNetError, ValueError) as e:
        raise InputError(f"--pretrained {uri}: does not fit {name}: {_reason(e)}") from e
    log.info("pretrained features from %s", uri)
    return source


def _read_arrays(path: str, uri: str) -> dict[str, mx.nd.NDArray]:
    size = os.path.getsize(path)
    try:
        arrays = mx.nd.load(path)
    except mx.MXNetError as e:
        raise InputError(
            f"--pretrained {uri}: not an MXNet parameters file ({size} bytes; empty, "
            "truncated or another format)"
        ) from e
    if not isinstance(arrays, dict):
        raise InputError(f"--pretrained {uri}: not a save_parameters file (arrays have no names)")
    return arrays


def _output_classes(arrays: dict[str, mx.nd.NDArray], uri: str) -> int:
    weight = arrays.get("output.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] < 1:
        raise InputError(
            f"--pretrained {uri}: not a save_parameters file of a ResNet (no 2-D output.weight)"
        )
    return int(weight.shape[0])


def _check_names(
    source: gluon.Block, arrays: dict[str, mx.nd.NDArray], name: str, uri: str
) -> None:
    """Another architecture's file has other parameter names (or other shapes, which
    load_parameters reports)."""
    expected = set(source._collect_params_with_prefix())  # noqa: SLF001 - the names save_parameters writes
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        example = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}"
        raise InputError(
            f"--pretrained {uri}: does not fit {name}: parameters of another network (the "
            f"file {example}; {len(missing)} missing, {len(extra)} unexpected); use the "
            "--model it was trained as"
        )


def _reason(e: BaseException) -> str:
    """The message line that says what is wrong (MXNet's errors carry a C++ backtrace)."""
    lines = [
        line.strip()
        for line in str(e).splitlines()
        if line.strip() and not line.startswith((" ", "Traceback", "[bt]", "Stack trace"))
    ]
    return (lines[-1] if lines else type(e).__name__)[:300]


def count_parameters(block: gluon.Block) -> int:
    return sum(int(p.data().size) for p in block.collect_params().values() if p._data is not None)  # noqa: SLF001 - deferred parameters have no size yet
