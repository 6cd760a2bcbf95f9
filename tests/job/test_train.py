"""The training loop in one process (size 1): checkpoints, resume, divergence, BatchNorm."""

import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon.model_zoo import vision

from job.errors import DivergedError
from job.training import lifecycle, loop


def params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(path).items()}


@pytest.mark.slow
def test_summary_and_exported_files(tiny_dataset, tmp_path, make_config):
    out = str(tmp_path / "run")
    summary = lifecycle.run(make_config(tiny_dataset, out, tta=True))
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "model",
        "classes",
        "epochs",
        "global_batch_size",
        "workers",
        "val_top1",
        "val_top1_tta",
        "train_images_per_second",
        "wall_seconds",
        "history",
    ):
        assert on_disk[key] is not None, key
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2]
    assert on_disk["global_batch_size"] == 8 and on_disk["workers"] == 1
    for name in ("model-symbol.json", "model-0000.params", "model.params"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert on_disk["config"]["image_size"] == 32


class SimulatedCrashError(Exception):
    pass


@pytest.mark.slow
def test_resumed_run_continues_from_the_saved_epoch_with_identical_parameters(
    tiny_dataset, tmp_path, monkeypatch, make_config
):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    lifecycle.run(make_config(tiny_dataset, straight, epochs=3))

    save = loop.Run.checkpoint

    def crash_after_first_checkpoint(self):
        save(self)
        raise SimulatedCrashError

    monkeypatch.setattr(loop.Run, "checkpoint", crash_after_first_checkpoint)
    with pytest.raises(SimulatedCrashError):
        lifecycle.run(make_config(tiny_dataset, interrupted, epochs=3))
    monkeypatch.undo()
    resumed = lifecycle.run(make_config(tiny_dataset, interrupted, epochs=3))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # no epoch counted twice
    a = params(os.path.join(straight, "model.params"))
    b = params(os.path.join(interrupted, "model.params"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_checkpoint_loads_exactly_what_was_saved(tiny_dataset, tmp_path, make_config):
    out = str(tmp_path / "run")
    lifecycle.run(make_config(tiny_dataset, out, epochs=1))
    from job.storage import Storage
    from job.training.checkpoint import Checkpointer

    ckpt = Checkpointer(Storage(), out, keep=3)
    folder = ckpt.latest()
    net = vision.get_model("resnet18_v2", classes=3)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"momentum": 0.9})
    progress, saved_config = ckpt.load(folder, net, trainer, mx.cpu())
    assert progress.epoch == 1 and progress.batch == 0 and len(progress.history) == 1
    assert saved_config["epochs"] == 1
    saved = params(os.path.join(folder, "model.params"))
    loaded = {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}
    for key in saved:
        np.testing.assert_array_equal(saved[key], loaded[key])


@pytest.mark.slow
def test_old_checkpoints_are_pruned(tiny_dataset, tmp_path, make_config):
    out = str(tmp_path / "run")
    lifecycle.run(make_config(tiny_dataset, out, epochs=4, keep_checkpoints=2))
    pointer = json.load(open(os.path.join(out, "checkpoints", "latest")))
    run_id = pointer["run_id"]
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    # 12 steps an epoch; folders carry the run's id
    assert names == ["latest", f"step-00000036-{run_id}", f"step-00000048-{run_id}"]
    assert pointer["checkpoint"] == f"step-00000048-{run_id}"


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tiny_dataset, tmp_path, make_config
):
    out = str(tmp_path / "run")
    cfg = make_config(
        tiny_dataset,
        out,
        epochs=3,
        warmup_epochs=0,
        lr_schedule="step",
        lr_steps=(1,),
    )
    # A decay no valid config allows (its rule keeps lr_decay <= 1) makes epoch 2 diverge
    # while epoch 1 trains normally: set past the check, as a broken optimizer would behave.
    object.__setattr__(cfg, "lr_decay", 1e12)
    with pytest.raises(
        DivergedError,
        match=r"training loss is (nan|inf) at epoch 2 .*"
        r"Last good checkpoint: .*step-",
    ):
        lifecycle.run(cfg)
    pointer = json.load(open(os.path.join(out, "checkpoints", "latest")))
    state = json.load(open(os.path.join(out, "checkpoints", pointer["checkpoint"], "state.json")))
    assert state["progress"]["epoch"] == 1
    weights = params(os.path.join(out, "checkpoints", pointer["checkpoint"], "model.params"))
    assert all(np.isfinite(w).all() for w in weights.values())
    assert not os.path.exists(os.path.join(out, "summary.json"))


@pytest.mark.slow
def test_input_batchnorm_statistics_train(tiny_dataset, tmp_path, make_config):
    """MXNet updates BatchNorm running stats in backward; ResNet v2's input BatchNorm has no
    parameters, so without an input gradient its stats stay exactly 0/1 and eval collapses.
    (No accuracy threshold: what a tiny run reaches is not behaviour; the stats moving is.)"""
    out = str(tmp_path / "run")
    lifecycle.run(
        make_config(tiny_dataset, out, epochs=2, brightness=0, contrast=0, saturation=0, hue=0)
    )
    weights = params(os.path.join(out, "model.params"))
    assert not np.allclose(weights["features.0.running_mean"], 0)
    assert not np.allclose(weights["features.0.running_var"], 1)
    # The exported model carries them: evaluate's eval-mode pass uses these very statistics.
    exported = params(os.path.join(out, "model-0000.params"))
    key = next(k for k in exported if k.endswith("running_mean"))
    np.testing.assert_array_equal(exported[key], weights["features.0.running_mean"])


@pytest.mark.slow
def test_frozen_features_stay_put(tiny_dataset, tmp_path, make_config):
    source = vision.get_model("resnet18_v2", classes=5)
    source.initialize(mx.init.Xavier())
    source(mx.nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / "source.params")
    source.save_parameters(path)
    out = str(tmp_path / "run")
    lifecycle.run(
        make_config(tiny_dataset, out, pretrained=path, freeze_features=True, head_lr_mult=10)
    )
    before, after = params(path), params(os.path.join(out, "model.params"))
    for key in before:
        if key.startswith("features."):
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert not np.allclose(after["output.weight"][:3], 0)
    assert after["output.weight"].shape == (3, 512)


@pytest.mark.slow
def test_synthetic_run_needs_no_data(make_config, tmp_path):
    config = make_config("", tmp_path / "run", synthetic=True, synthetic_images=64, epochs=1)
    summary = lifecycle.run(config)
    assert summary["num_classes"] == 10 and summary["history"][0]["train_seconds"] > 0
