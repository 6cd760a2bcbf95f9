"""A Triton Inference Server model repository for a run's ONNX model.

Layout (Triton's own: one folder per model, numbered version folders)::

    triton/<name>/config.pbtxt        platform onnxruntime_onnx, batch size, inputs, outputs
    triton/<name>/labels.txt          the classes, one a line, in output order
    triton/<name>/1/model.onnx
    triton/<name>_uint8/...           with --onnx-preprocess: uint8 RGB NHWC in, softmax out

``config.pbtxt`` is protobuf text of Triton's ``inference.ModelConfig``; the tests parse it
with the message that tritonclient ships.
"""

from __future__ import annotations

import os
import shutil

from job.outputs import onnx_export as ox

LABELS = "labels.txt"
VERSION = "1"


def _tensor(name: str, data_type: str, dims: list[int], extra: str = "") -> str:
    lines = [
        "  {",
        f'    name: "{name}"',
        f"    data_type: {data_type}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    lines += [f"    {line}" for line in extra.splitlines() if line]
    return "\n".join([*lines, "  }"])


def config_text(
    name: str, num_classes: int, image_size: int, max_batch_size: int, pixels: bool = False
) -> str:
    """``config.pbtxt`` of the float model, or of its uint8 preprocessing variant."""
    if pixels:
        inp = _tensor(ox.PIXELS, "TYPE_UINT8", [image_size, image_size, 3], "format: FORMAT_NHWC")
        out_name = ox.PROBABILITIES
    else:
        inp = _tensor(ox.INPUT, "TYPE_FP32", [3, image_size, image_size], "format: FORMAT_NCHW")
        out_name = ox.OUTPUT
    out = _tensor(out_name, "TYPE_FP32", [num_classes], f'label_filename: "{LABELS}"')
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inp}\n]\n"
        f"output [\n{out}\n]\n"
        "dynamic_batching { }\n"
    )


def write_model(
    repo: str,
    name: str,
    onnx_path: str,
    classes: list[str],
    image_size: int,
    max_batch_size: int,
    pixels: bool = False,
) -> str:
    """Write one model folder into the local repository ``repo``; returns the folder."""
    folder = os.path.join(repo, name)
    os.makedirs(os.path.join(folder, VERSION), exist_ok=True)
    shutil.copyfile(onnx_path, os.path.join(folder, VERSION, "model.onnx"))
    with open(os.path.join(folder, LABELS), "w", encoding="utf-8") as fh:
        fh.write("".join(c + "\n" for c in classes))
    with open(os.path.join(folder, "config.pbtxt"), "w", encoding="utf-8") as fh:
        fh.write(config_text(name, len(classes), image_size, max_batch_size, pixels))
    return folder
