import json

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon.model_zoo import vision

from job.config import Config
from job.errors import InputError
from job.storage import Storage
from job.training import model


def source_file(tmp_path, name="resnet18_v2", classes=5):
    net = vision.get_model(name, classes=classes)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / f"{name}.params")
    net.save_parameters(path)
    return path, net


def structural(block):
    return {k: v.data().asnumpy() for k, v in block._collect_params_with_prefix().items()}


def build(tmp_path, **kw):
    cfg = Config(data="d", output="o", image_size=32, **kw)
    return model.build(cfg, 3, mx.cpu(), Storage())


def test_features_come_from_the_pretrained_file_and_the_head_is_new(tmp_path):
    path, source = source_file(tmp_path)
    net = build(tmp_path, pretrained=path)
    got, want = structural(net.features), structural(source.features)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert net.output.weight.shape == (3, 512)
    assert net(mx.nd.zeros((2, 3, 32, 32))).shape == (2, 3)


def test_head_is_xavier_initialised_with_its_own_lr_mult(tmp_path):
    path, _ = source_file(tmp_path)
    net = build(tmp_path, pretrained=path, head_lr_mult=7)
    w = net.output.weight.data().asnumpy()
    bound = np.sqrt(6 / (512 + 3)) * np.sqrt(3)  # Xavier uniform, magnitude 3, avg factor
    assert 0 < np.abs(w).max() <= bound and np.abs(w).std() > 0
    assert np.all(net.output.bias.data().asnumpy() == 0)
    assert {p.lr_mult for p in net.output.collect_params().values()} == {7}
    assert {p.lr_mult for p in net.features.collect_params().values()} == {1}


def test_no_weight_decay_on_batchnorm_and_biases(tmp_path):
    net = build(tmp_path, pretrained="none")
    for name, p in net.collect_params().items():
        decays = p.wd_mult != 0
        assert decays == (name.endswith("weight") and "batchnorm" not in name), name


def test_freeze_features_stops_their_gradients(tmp_path):
    path, _ = source_file(tmp_path)
    net = build(tmp_path, pretrained=path, freeze_features=True)
    assert {p.grad_req for p in net.features.collect_params().values()} == {"null"}
    assert {p.grad_req for p in net.output.collect_params().values()} == {"write"}


def test_pretrained_file_of_another_architecture_is_named(tmp_path):
    path, _ = source_file(tmp_path, "resnet34_v2")
    with pytest.raises(
        InputError, match=r"--pretrained .*resnet34_v2.params: does not fit resnet18_v2"
    ):
        build(tmp_path, pretrained=path)


def test_pretrained_file_that_is_not_params_is_named(tmp_path):
    path = tmp_path / "junk.params"
    path.write_bytes(b"junk")
    with pytest.raises(InputError, match=r"--pretrained .*junk.params"):
        build(tmp_path, pretrained=str(path))
    with pytest.raises(InputError, match=r"--pretrained .*missing.params: .*no such file"):
        build(tmp_path, pretrained=str(tmp_path / "missing.params"))


def test_zoo_without_network_fails_with_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet-home"))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(
        InputError,
        match=r"--pretrained zoo: cannot load .*resnet18_v2.*"
        r"--pretrained PATH.*--pretrained none",
    ):
        model._from_zoo("resnet18_v2", mx.cpu())


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1", "resnet34_v2", "resnet101_v2"])
def test_every_zoo_resnet_builds_with_a_new_head(tmp_path, name):
    path, _ = source_file(tmp_path, name, classes=4)
    net = model.build(
        Config(data="d", output="o", model=name, pretrained=path), 6, mx.cpu(), Storage()
    )
    assert net(mx.nd.zeros((1, 3, 32, 32))).shape == (1, 6)


def test_latest_pointer_of_a_retraining_root_resolves_to_its_model(tmp_path):
    path, source = source_file(tmp_path)
    pointer = {"run": "r1", "model": path, "val_top1": 0.9}
    (tmp_path / "latest").write_text(json.dumps(pointer))
    net = build(tmp_path, pretrained=str(tmp_path / "latest"))
    np.testing.assert_array_equal(
        net.features[1].weight.data().asnumpy(), source.features[1].weight.data().asnumpy()
    )
    with pytest.raises(InputError, match="no run has passed the gate yet"):
        build(tmp_path, pretrained=str(tmp_path / "other" / "latest"))
