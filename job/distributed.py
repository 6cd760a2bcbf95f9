"""Every Horovod call of the job: rank facts, broadcast, the distributed trainer, reductions.

The same code runs as one plain process without a launcher (size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    size: int
    local_size: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def context(self) -> mx.Context:
        """``gpu(local_rank)`` when GPUs exist, else the CPU."""
        return mx.gpu(self.local_rank) if mx.context.num_gpus() > 0 else mx.cpu()


def init() -> Dist:
    import horovod.mxnet as hvd

    hvd.init()  # Horovod: start the controller (MPI or Gloo)
    return Dist(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())


def broadcast_parameters(params: Any) -> None:
    import horovod.mxnet as hvd

    hvd.broadcast_parameters(params, root_rank=0)  # Horovod: every rank starts from rank 0's


def trainer(params: Any, optimizer: str, optimizer_params: dict, fp16: bool) -> Any:
    """``hvd.DistributedTrainer``: gradients are averaged over ranks before each update."""
    import horovod.mxnet as hvd

    compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
    return hvd.DistributedTrainer(params, optimizer, optimizer_params, compression=compression)


def allreduce_sum(values: list[float], name: str) -> list[float]:
    """Sum a few numbers over all ranks (one small allreduce)."""
    import horovod.mxnet as hvd

    total = hvd.allreduce(
        mx.nd.array(np.asarray(values, np.float64), dtype="float64"), average=False, name=name
    )  # Horovod: sum over ranks
    return [float(v) for v in total.asnumpy()]


def average_in_place(arrays: list[Any], name: str) -> None:
    """Replace each array by its mean over ranks (e.g. BatchNorm running statistics)."""
    import horovod.mxnet as hvd

    for i, array in enumerate(arrays):
        hvd.allreduce_(array, average=True, name=f"{name}.{i}")  # Horovod: mean over ranks


def allgather_object(value: Any, name: str) -> list[Any]:
    import horovod.mxnet as hvd

    return list(hvd.allgather_object(value, name=name))  # Horovod: one value per rank


def barrier() -> None:
    import horovod.mxnet as hvd

    hvd.allreduce(mx.nd.zeros(1), name="barrier").wait_to_read()  # Horovod: wait for all ranks
