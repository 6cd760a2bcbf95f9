"""ONNX export of a ResNet v2 and the Triton model config, checked with onnx, onnxruntime and
Triton's own ModelConfig message (from tritonclient)."""

import importlib.util
import os

import mxnet as mx
import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from mxnet.gluon.model_zoo import vision
from onnx import numpy_helper

from job.input.augment import MEAN_RGB, STD_RGB
from job.outputs import onnx_export as ox
from job.outputs import triton

SIZE, CLASSES = 32, 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A resnet18_v2 whose first BatchNorm (fix_gamma) holds a gamma far from 1, and whose
    running statistics are not the initial ones: (folder, net)."""
    folder = str(tmp_path_factory.mktemp("onnx"))
    net = vision.get_model("resnet18_v2", classes=CLASSES)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, SIZE, SIZE)))
    rng = np.random.default_rng(0)
    for name, p in net.collect_params().items():
        if "running_mean" in name:
            p.set_data(mx.nd.array(rng.uniform(-0.5, 0.5, p.shape)))
        elif "running_var" in name or "gamma" in name:
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    net.features[0].gamma.set_data(mx.nd.array([0.2, 3.0, 5.0]))  # MXNet ignores it
    net.export(os.path.join(folder, "model"), epoch=0)
    ox.export(
        os.path.join(folder, "model-symbol.json"),
        os.path.join(folder, "model-0000.params"),
        os.path.join(folder, "model.onnx"),
        SIZE,
        CLASSES,
    )
    return folder, net


def images(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def test_model_is_opset_13_ir_7_with_no_weight_inputs_and_named_dims(exported):
    model = onnx.load(os.path.join(exported[0], "model.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert model.ir_version == 7
    assert [i.name for i in model.graph.input] == ["data"]
    assert len(model.graph.initializer) > 50
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, SIZE, SIZE]
    out = model.graph.output[0]
    assert out.name == "logits"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch",
        CLASSES,
    ]
    onnx.checker.check_model(model, full_check=True)


def test_fixed_gamma_is_one_in_the_onnx_file(exported):
    folder, net = exported
    symbol = open(os.path.join(folder, "model-symbol.json")).read()
    names = ox.fixed_gamma_names(symbol)
    assert names == [net.features[0].gamma.name]  # only the input BatchNorm has scale=False
    model = onnx.load(os.path.join(folder, "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(weights[names[0]], np.ones(3, np.float32))


@pytest.mark.parametrize("batch", [1, 5, 8])
def test_onnxruntime_matches_mxnet(exported, batch):
    folder, net = exported
    x = images(batch)
    theirs = ox.session(os.path.join(folder, "model.onnx")).run(["logits"], {"data": x})[0]
    np.testing.assert_allclose(theirs, net(mx.nd.array(x)).asnumpy(), atol=1e-4)


def test_compare_reports_agreement_at_batch_1_and_an_odd_batch(exported):
    folder, net = exported
    check = ox.compare(os.path.join(folder, "model.onnx"), net, images(8), mx.cpu())
    assert check.batch_sizes == (1, 7)
    assert check.max_abs_diff <= ox.TOLERANCE and check.top1_agreement == 1.0


def test_compare_fails_in_one_line_when_the_models_disagree(exported, tmp_path):
    folder, net = exported
    model = onnx.load(os.path.join(folder, "model.onnx"))
    for t in model.graph.initializer:  # a wrong head: what a broken converter would make
        if t.name.endswith("dense0_bias"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 0.5, t.name))
    broken = str(tmp_path / "broken.onnx")
    onnx.save(model, broken)
    with pytest.raises(ox.ExportError, match=r"differ by 0\.5 .* the export is wrong$"):
        ox.compare(broken, net, images(3), mx.cpu())


def test_uint8_variant_takes_pixels_and_returns_softmax(exported, tmp_path):
    folder, net = exported
    path = str(tmp_path / "pixels.onnx")
    ox.add_preprocessing(os.path.join(folder, "model.onnx"), path)
    pixels = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    prob = ox.session(path).run(["probabilities"], {"image": pixels})[0]
    normalized = ((pixels.astype(np.float32) - MEAN_RGB) / STD_RGB).transpose(0, 3, 1, 2)
    expected = mx.nd.softmax(net(mx.nd.array(normalized))).asnumpy()
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)


def model_config_message():
    """Triton's ``inference.ModelConfig``, from the generated module tritonclient ships (loaded
    by path: ``tritonclient.grpc`` itself wants the grpc extra)."""
    tritonclient = pytest.importorskip("tritonclient")
    path = os.path.join(os.path.dirname(tritonclient.__file__), "grpc", "model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pixels", [False, True], ids=["float", "uint8"])
def test_triton_config_parses_as_model_config_with_the_required_fields(exported, tmp_path, pixels):
    pb = model_config_message()
    folder = triton.write_model(
        str(tmp_path / "repo"), "shapes", os.path.join(exported[0], "model.onnx"),
        ["circle", "cross", "triangle"], SIZE, 16, pixels=pixels,
    )  # fmt: skip
    text = open(os.path.join(folder, "config.pbtxt")).read()
    config = text_format.Parse(text, pb.ModelConfig())
    assert config.name == "shapes" == os.path.basename(folder)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    (inp,) = config.input
    (out,) = config.output
    if pixels:
        assert (inp.name, inp.data_type, list(inp.dims)) == ("image", pb.TYPE_UINT8, [32, 32, 3])
        assert inp.format == pb.ModelInput.FORMAT_NHWC and out.name == "probabilities"
    else:
        assert (inp.name, inp.data_type, list(inp.dims)) == ("data", pb.TYPE_FP32, [3, 32, 32])
        assert out.name == "logits"
    assert out.data_type == pb.TYPE_FP32 and list(out.dims) == [3]
    assert out.label_filename == "labels.txt"
    labels = open(os.path.join(folder, out.label_filename)).read().splitlines()
    assert labels == ["circle", "cross", "triangle"]
    assert os.path.getsize(os.path.join(folder, "1", "model.onnx")) > 0
    assert config.HasField("dynamic_batching")
