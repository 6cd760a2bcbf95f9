"""Checkpoints taken as an in-memory copy and written on a background thread: at most one
write in flight, a due interval deferred (and counted) while one is, a failed write raised
in the training thread, and ``latest`` moved only once storage holds every byte."""

from __future__ import annotations

import json
import os
import threading

import mxnet as mx
import numpy as np
import pytest
from checkpoint_tools import restored_step, small_net, weights
from prometheus_client import CollectorRegistry

from job.errors import StorageError
from job.storage import Storage
from job.training.checkpoint import Checkpointer, Progress
from job.training.metrics import Metrics
from job.training.saver import Saver


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Gated(Checkpointer):
    """A real checkpointer whose writes wait for ``gate``, so a test decides when they end."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started = threading.Event()

    def write(self, snap):
        self.started.set()
        assert self.gate.wait(30)
        return super().write(snap)


@pytest.fixture
def metrics():
    return Metrics(rank=0, registry=CollectorRegistry())


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, {"rank": "0", **labels}) or 0.0


def take(ckpt, net, trainer, step):
    return lambda: ckpt.snapshot(net, trainer, Progress(step=step), {"lr": 0.1})


def test_a_due_interval_waits_for_the_write_in_flight_and_is_counted_once(tmp_path, metrics):
    ckpt, clock = Gated(Storage(), str(tmp_path), keep=3), Clock()
    saver = Saver(ckpt, metrics, interval=1.0, clock=clock)
    net, trainer = small_net()
    assert not saver.due()
    clock.now = 60.0
    assert saver.due() and not saver.due()  # asked once, until it is taken
    saver.save(take(ckpt, net, trainer, 1))
    assert ckpt.started.wait(30) and saver.busy

    clock.now = 125.0  # the next one falls due while the first is being written
    assert not saver.due() and not saver.due()
    assert sample(metrics, "finetune_checkpoints_deferred_total") == 1
    assert not os.path.exists(tmp_path / "checkpoints" / "latest")

    ckpt.gate.set()
    assert saver.finish(timeout=30)
    assert saver.due()  # taken at the first step after the write ended
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["step"] == 1
    assert sample(metrics, "finetune_checkpoint_stall_seconds_count") == 1
    assert sample(metrics, "finetune_checkpoint_seconds_count") == 1


def test_no_interval_means_no_checkpoint_in_between(tmp_path, metrics):
    clock = Clock()
    saver = Saver(Checkpointer(Storage(), str(tmp_path), keep=3), metrics, 0, clock=clock)
    clock.now = 10**6
    assert not saver.due()


def test_the_snapshot_is_what_is_written_whatever_training_does_meanwhile(tmp_path, metrics):
    ckpt = Gated(Storage(), str(tmp_path), keep=3)
    saver = Saver(ckpt, metrics, interval=0)
    net, trainer = small_net(1)
    before = weights(net)
    saver.save(take(ckpt, net, trainer, 7))
    for param in net.collect_params().values():  # training goes on while it is written
        param.set_data(param.data() + 1)
    ckpt.gate.set()
    saver.finish(timeout=30)
    step, restored = restored_step(ckpt)
    assert step == 7
    for key, value in before.items():
        np.testing.assert_array_equal(restored[key], value)


def test_a_failed_write_is_raised_at_the_next_check_and_latest_stays(tmp_path, metrics):
    ckpt = Checkpointer(Storage(), str(tmp_path), keep=3)
    saver = Saver(ckpt, metrics, interval=0)
    net, trainer = small_net()
    saver.save(take(ckpt, net, trainer, 1), wait=True)
    first = (tmp_path / "checkpoints" / "latest").read_text()

    blocked = tmp_path / "checkpoints" / f"step-00000002-{ckpt.run_id}"
    blocked.write_text("a file where the folder goes")  # the write cannot create it
    saver.save(take(ckpt, net, trainer, 2))
    assert saver._idle.wait(30)
    with pytest.raises(StorageError, match=str(blocked)):
        saver.check()
    saver.check()  # raised once
    assert (tmp_path / "checkpoints" / "latest").read_text() == first


def test_the_pointer_moves_only_once_storage_holds_every_byte(tmp_path, monkeypatch):
    storage = Storage()
    ckpt = Checkpointer(storage, str(tmp_path), keep=3)
    net, trainer = small_net()
    real_size = storage.size
    monkeypatch.setattr(storage, "size", lambda uri: real_size(uri) - uri.endswith(".params"))
    with pytest.raises(StorageError, match="model.params: storage holds"):
        ckpt.write(ckpt.snapshot(net, trainer, Progress(step=3), {}))
    assert not os.path.exists(tmp_path / "checkpoints" / "latest")
    assert not os.listdir(tmp_path / "checkpoints")  # what it wrote is removed


def test_the_optimizer_state_in_memory_is_what_save_states_writes(tmp_path):
    from job.training.checkpoint import trainer_states

    net, trainer = small_net()
    with mx.autograd.record():
        loss = net(mx.nd.ones((2, 4))).sum()
    loss.backward()
    trainer.step(2)
    trainer.save_states(str(tmp_path / "states"))
    assert trainer_states(trainer) == (tmp_path / "states").read_bytes()
