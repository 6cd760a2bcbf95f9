"""ONNX export of a run's model, checked against MXNet before anything is written.

``mx.onnx.export_model`` (MXNet 1.9.1, ``onnx>=1.15,<1.19``: 1.19 removed ``onnx.mapping``)
needs four fixes before Triton or onnxruntime take its file as a serving model:

1. It stamps the newest opset the installed onnx knows (23 with onnx 1.18) and that IR
   version, although its translations stop at opset 13. The model is stamped opset 13, IR 7
   (what onnxruntime >= 1.18 and Triton's onnxruntime backend load), and onnx's checker then
   proves every node is valid at opset 13.
2. Every parameter is listed both as an initializer and as a graph input, so runtimes treat
   weights as overridable inputs and skip constant folding. The duplicates are dropped.
3. ``fix_gamma`` is dropped: a BatchNorm that MXNet runs with gamma fixed at 1 (ResNet v2's
   first layer, ``scale=False``) uses the stored gamma in ONNX. Those gammas are set to 1
   before the export.
4. The batch dimension is named ``batch`` (dynamic) and the output's class dimension is the
   number of classes; the output is called ``logits``.

The optional preprocessing variant (``--onnx-preprocess``) wraps the model so that it takes
decoded uint8 RGB pixels, NHWC, and returns softmax probabilities: clients send pixels.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from job.errors import JobError
from job.input.augment import MEAN_RGB, STD_RGB

log = logging.getLogger(__name__)

OPSET = 13
IR_VERSION = 7
INPUT, OUTPUT = "data", "logits"
PIXELS, PROBABILITIES = "image", "probabilities"
# Largest |onnx - mxnet| of a logit that still counts as the same model, per unit of the
# largest logit magnitude (at least 1): float32 sums differ in their last bits.
TOLERANCE = 1e-4


class ExportError(JobError):
    """The ONNX file could not be made, or it computes something else than the MXNet model."""


@dataclass(frozen=True)
class Check:
    max_abs_diff: float
    top1_agreement: float
    images: int
    batch_sizes: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": float(self.max_abs_diff),
            "top1_agreement": round(float(self.top1_agreement), 6),
            "images": self.images,
            "batch_sizes": list(self.batch_sizes),
        }


def fixed_gamma_names(symbol_json: str) -> list[str]:
    """Gamma parameters of the BatchNorm nodes that run with ``fix_gamma=True``."""
    graph = json.loads(symbol_json)
    nodes = graph["nodes"]
    names = []
    for node in nodes:
        attrs = node.get("attrs") or node.get("param") or {}
        if node["op"] == "BatchNorm" and str(attrs.get("fix_gamma", "True")) == "True":
            gamma = nodes[node["inputs"][1][0]]["name"]  # inputs: data, gamma, beta, mean, var
            names.append(gamma)
    return names


def export(
    symbol_path: str, params_path: str, onnx_path: str, image_size: int, num_classes: int
) -> None:
    """Write ``onnx_path`` from an exported MXNet model (``net.export`` files)."""
    import mxnet as mx
    import onnx

    with open(symbol_path, encoding="utf-8") as fh:
        sym_json = fh.read()
    # Objects, not file names: given files, export_model reloads the params from the
    # symbol file's prefix and epoch, whatever params file it was given.
    params = {k.split(":", 1)[-1]: v for k, v in mx.nd.load(params_path).items()}
    for name in fixed_gamma_names(sym_json):  # 3. MXNet ignores these gammas; ONNX would not
        params[name] = mx.nd.ones_like(params[name])
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(max(level, logging.WARNING))  # the converter logs its steps to root
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mx.onnx.export_model(
                mx.sym.load_json(sym_json),
                params,
                [(1, 3, image_size, image_size)],
                [np.float32],
                onnx_path,
                dynamic=True,
                dynamic_input_shapes=[(None, 3, image_size, image_size)],
            )
    except Exception as e:  # noqa: BLE001 - the converter raises anything; one line for all
        raise ExportError(f"ONNX export of {symbol_path} failed: {type(e).__name__}: {e}") from e
    finally:
        root.setLevel(level)
    model = onnx.load(onnx_path)
    fix_graph(model, num_classes)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"{onnx_path}: not a valid opset-{OPSET} model: {first}") from e
    onnx.save(model, onnx_path)


def fix_graph(model: Any, num_classes: int) -> None:
    """Fixes 1, 2 and 4 of the module docstring, in place."""
    del model.opset_import[:]
    model.opset_import.add(domain="", version=OPSET)
    model.ir_version = IR_VERSION
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    _rename(graph, graph.input[0].name, INPUT)
    _rename(graph, graph.output[0].name, OUTPUT)
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dims = graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    dims[1].dim_value = num_classes


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def add_preprocessing(onnx_path: str, out_path: str) -> None:
    """A variant of the model: uint8 RGB NHWC pixels in, softmax probabilities out.

    Cast, (x - mean) / std and NHWC → NCHW run inside the graph, exactly as the job's
    evaluation transform does after its center crop, so a client only decodes and crops.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(onnx_path)
    graph = model.graph
    size = graph.input[0].type.tensor_type.shape.dim[2].dim_value
    mean = numpy_helper.from_array(MEAN_RGB.reshape(1, 3, 1, 1).astype(np.float32), "pre_mean")
    std = numpy_helper.from_array(STD_RGB.reshape(1, 3, 1, 1).astype(np.float32), "pre_std")
    pre = [
        helper.make_node("Cast", [PIXELS], ["pre_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_float"], ["pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["pre_nchw", "pre_mean"], ["pre_centered"]),
        helper.make_node("Div", ["pre_centered", "pre_std"], [INPUT]),
    ]
    post = [helper.make_node("Softmax", [OUTPUT], [PROBABILITIES], axis=1)]
    num_classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    new_graph = helper.make_graph(
        pre + list(graph.node) + post,
        graph.name + "_uint8",
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[*graph.initializer, mean, std],
    )
    wrapped = helper.make_model(
        new_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(wrapped, full_check=True)
    onnx.save(wrapped, out_path)


def session(onnx_path: str) -> Any:
    """An onnxruntime session on the CPU, quiet about the graph it optimises."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


def compare(onnx_path: str, net: Any, images: np.ndarray, ctx: Any) -> Check:
    """Run both models on ``images`` (NCHW float32) at batch 1 and at an odd batch size.

    Raises ExportError when a logit differs by more than TOLERANCE times the largest logit
    magnitude (at least 1).
    """
    import mxnet as mx

    sess = session(onnx_path)
    odd = max(1, len(images) - (1 - len(images) % 2))  # the largest odd size that fits
    diffs, agree, seen, scale = [0.0], 0, 0, 1.0
    for batch in (1, odd):
        for start in range(0, len(images) - batch + 1, batch):
            x = images[start : start + batch]
            ours = net(mx.nd.array(x, ctx=ctx)).asnumpy()
            theirs = sess.run([OUTPUT], {INPUT: x})[0]
            diffs.append(float(np.abs(ours - theirs).max()))
            scale = max(scale, float(np.abs(ours).max()))
            agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
            seen += len(x)
    check = Check(max(diffs), agree / max(seen, 1), len(images), (1, odd))
    if check.max_abs_diff > TOLERANCE * scale:
        raise ExportError(
            f"{onnx_path}: ONNX and MXNet outputs differ by {check.max_abs_diff:.3g} "
            f"(> {TOLERANCE:g} x {scale:.3g}, the largest logit) on {len(images)} validation "
            "images; the export is wrong"
        )
    return check
