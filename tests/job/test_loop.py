"""The training loop driven in memory: a fake single-rank backend, batches from a list, a tiny
network, local storage. No Horovod, no data pipeline; a few steps in about a second."""

from __future__ import annotations

import json
import os
import threading

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from prometheus_client import CollectorRegistry

from job.errors import PreemptedError
from job.input.data import Batch
from job.storage import Storage
from job.training.checkpoint import Checkpointer
from job.training.distributed import Single
from job.training.loop import Run
from job.training.metrics import Metrics

CLASSES, SIZE, BATCH = 3, 16, 4


class Tiny(gluon.HybridBlock):
    """``features`` and ``output`` like a model-zoo ResNet, small enough for milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = gluon.nn.HybridSequential()
        self.features.add(gluon.nn.Conv2D(4, 3, padding=1), gluon.nn.BatchNorm())
        self.features.add(gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D())
        self.output = gluon.nn.Dense(CLASSES)

    def hybrid_forward(self, F, x):  # noqa: N803 - Gluon's signature
        return self.output(self.features(x))


class Batches:
    """An epoch is ``steps`` fixed batches; ``on_batch(epoch, i)`` runs as batch i is handed
    out. Records which batches each epoch delivered."""

    def __init__(self, steps: int, on_batch=lambda epoch, i: None) -> None:
        rng = np.random.default_rng(0)
        self.batches = [
            Batch(
                rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32),
                rng.integers(0, CLASSES, BATCH).astype(np.float32),
                BATCH,
            )
            for _ in range(steps)
        ]
        self.steps_per_epoch, self.on_batch = steps, on_batch
        self.delivered: list[tuple[int, int]] = []

    def steps_left(self, skip: int, trained_by: int = 0) -> int:
        return self.steps_per_epoch - skip

    def epoch(self, epoch: int, skip_batches: int = 0, trained_by: int = 0):
        for i in range(skip_batches, self.steps_per_epoch):
            self.on_batch(epoch, i)
            self.delivered.append((epoch, i))
            yield self.batches[i]

    def close(self) -> None:
        pass


class RecordingTrainer(gluon.Trainer):
    """The real Gluon trainer; remembers the lr of every step."""

    def __init__(self, params) -> None:
        super().__init__(params, "sgd", {"learning_rate": 0.1, "momentum": 0.9}, kvstore=None)
        self.rates: list[float] = []

    def set_learning_rate(self, lr: float) -> None:
        self.rates.append(lr)
        super().set_learning_rate(lr)


# The run: synthetic (the batches come from the test), steps of BATCH images of SIZE
# pixels, no step watchdog; "model" only names the network in the summary (it is Tiny).
RUN = dict(
    synthetic=True,
    model="resnet18_v1",
    batch_size=BATCH,
    image_size=SIZE,
    lr=0.1,
    warmup_epochs=1.0,
    log_interval=100,
    step_timeout=0,
)


@pytest.fixture
def make_run(make_config):
    """``make_run(out, loader, stop=None, **overrides)``: a Run of Tiny over ``loader``."""

    def build(out, loader, stop=None, **kw) -> Run:
        mx.random.seed(0)
        net = Tiny()
        net.initialize(mx.init.Xavier())
        net.hybridize()
        net(mx.nd.zeros((BATCH, 3, SIZE, SIZE)))
        return Run(
            make_config("", out, **{**RUN, **kw}),
            dist=Single(),
            net=net,
            trainer=RecordingTrainer(net.collect_params()),
            train=loader,
            val=None,
            classes=[f"c{i}" for i in range(CLASSES)],
            storage=Storage(),
            metrics=Metrics(0, CollectorRegistry()),
            stop=stop,
        )

    return build


def state(out) -> dict:
    folder = Checkpointer(Storage(), str(out), keep=3).latest()
    assert folder is not None
    return json.load(open(os.path.join(folder, "state.json")))


def test_lr_warms_up_over_the_first_epoch_then_decays_by_cosine(tmp_path, make_run):
    run = make_run(tmp_path, Batches(4))
    run.fit()
    rates = run.trainer.rates
    # Warmup: a step's rate is where it ends (1/4 .. 4/4 of the epoch); then cosine from the
    # peak, by where each step of the second (last) epoch starts.
    cosine = [0.05 * (1 + np.cos(np.pi * i / 4)) for i in range(4)]
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, *cosine])


def test_each_epoch_is_checkpointed_with_its_progress_and_weights(tmp_path, make_run):
    run = make_run(tmp_path, Batches(4))
    run.fit()
    saved = state(tmp_path)
    progress = saved["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (2, 0, 8)
    assert progress["images"] == 0 and progress["workers"] == 1
    assert [h["epoch"] for h in progress["history"]] == [1, 2]
    assert saved["config"]["epochs"] == 2
    folder = Checkpointer(Storage(), str(tmp_path), keep=3).latest()
    weights = mx.nd.load(os.path.join(folder, "model.params"))
    mine = {k: v.data().asnumpy() for k, v in run.net._collect_params_with_prefix().items()}
    assert set(weights) == set(mine)
    for key, value in weights.items():
        np.testing.assert_array_equal(value.asnumpy(), mine[key])


@pytest.mark.parametrize("log_interval", [1, 100], ids=["every-step-synced", "pipelined"])
def test_sigterm_stops_at_an_agreed_step_that_is_checkpointed_and_resumed(
    tmp_path, log_interval, make_run
):
    stop = threading.Event()

    def sigterm_at_batch_2(epoch, i):
        if (epoch, i) == (0, 2):
            stop.set()

    out = tmp_path / "stopped"
    run = make_run(out, Batches(8, sigterm_at_batch_2), stop, log_interval=log_interval)
    with pytest.raises(PreemptedError, match=r"stopped by SIGTERM at epoch 1, step (3|4) "):
        run.fit()
    progress = state(out)["progress"]
    # The flag of step 2 is read when that step is known to be done: at its end when every
    # step syncs, one step later when a step stays in flight.
    assert progress["batch"] == progress["step"] == (3 if log_interval == 1 else 4)
    assert progress["images"] == progress["batch"] * BATCH and progress["history"] == []

    straight = make_run(tmp_path / "straight", Batches(8), log_interval=log_interval)
    straight.fit()
    resumed = make_run(out, Batches(8), log_interval=log_interval)
    resumed.resume()
    resumed.fit()
    done = progress["batch"]
    assert resumed.train.delivered[0] == (0, done)  # the next batch, none redone
    assert resumed.trainer.rates == pytest.approx(straight.trainer.rates[done:])
    assert [h["epoch"] for h in resumed.progress.history] == [1, 2]
    for key, param in straight.net._collect_params_with_prefix().items():
        np.testing.assert_allclose(
            param.data().asnumpy(),
            resumed.net._collect_params_with_prefix()[key].data().asnumpy(),
            rtol=1e-5,
            atol=1e-6,
            err_msg=key,
        )


def test_phases_are_observed_on_one_sampled_step_per_log_interval(tmp_path, make_run):
    run = make_run(tmp_path, Batches(6), log_interval=4, epochs=1)
    run.fit()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in run.metrics.registry.collect()
        for s in family.samples
    }
    rank = (("rank", "0"),)
    assert got[("finetune_steps_total", rank)] == 6
    # Steps 4 and 6 (the log interval's and the epoch's last) were timed; the others ran
    # without a device sync.
    assert got[("finetune_step_seconds_count", rank)] == 2
    for phase in ("data", "compute", "allreduce"):
        assert got[("finetune_step_phase_seconds_count", (("phase", phase), *rank))] == 2
