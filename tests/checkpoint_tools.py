"""A small model and optimizer to checkpoint, and what a restore gives back."""

from __future__ import annotations

import mxnet as mx
import numpy as np

from job.training.checkpoint import Checkpointer


def small_net(seed: int = 0) -> tuple[mx.gluon.Block, mx.gluon.Trainer]:
    mx.random.seed(seed)
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Xavier())
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    return net, trainer


def weights(net: mx.gluon.Block) -> dict[str, np.ndarray]:
    return {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}


def restored_step(ckpt: Checkpointer) -> tuple[int, dict]:
    net, trainer = small_net(99)
    result = ckpt.restore(net, trainer, mx.cpu())
    assert result is not None
    return result[1].step, weights(net)
