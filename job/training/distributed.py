"""Every Horovod call of the job: rank facts, broadcast, the distributed trainer, reductions.

The training loop gets one backend object: ``Horovod`` (``init()``) under a launcher, or
``Single`` for one process without Horovod (also what unit tests drive the loop with).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Rank facts and the collectives the loop uses; this base is a single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def context(self) -> mx.Context:
        """``gpu(local_rank)`` when GPUs exist, else the CPU."""
        return mx.gpu(self.local_rank) if mx.context.num_gpus() > 0 else mx.cpu()

    def broadcast_parameters(self, params: Any) -> None:
        pass

    def trainer(self, params: Any, optimizer: str, optimizer_params: dict, fp16: bool) -> Any:
        return mx.gluon.Trainer(params, optimizer, optimizer_params, kvstore=None)

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        return [float(v) for v in values]

    def allreduce_sum_async(self, values: list[float], name: str) -> Any:
        """Start a sum over ranks; ``.asnumpy()`` on the result waits for it."""
        return mx.nd.array(np.asarray(values, np.float64), dtype="float64")

    def average_in_place(self, arrays: list[Any], name: str) -> None:
        pass

    def allgather_object(self, value: Any, name: str) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass


Single = Dist


class Horovod(Dist):
    """The same calls through Horovod (MPI or Gloo): every rank takes part in each."""

    def broadcast_parameters(self, params: Any) -> None:
        import horovod.mxnet as hvd

        hvd.broadcast_parameters(params, root_rank=0)  # Horovod: every rank starts from rank 0's

    def trainer(self, params: Any, optimizer: str, optimizer_params: dict, fp16: bool) -> Any:
        """``hvd.DistributedTrainer``: gradients are averaged over ranks before each update."""
        import horovod.mxnet as hvd

        compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
        # Horovod: allreduce of the gradients inside trainer.step
        return hvd.DistributedTrainer(params, optimizer, optimizer_params, compression=compression)

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        """Sum a few numbers over all ranks (one small allreduce)."""
        return [float(v) for v in self.allreduce_sum_async(values, name).asnumpy()]

    def allreduce_sum_async(self, values: list[float], name: str) -> Any:
        import horovod.mxnet as hvd

        return hvd.allreduce(
            mx.nd.array(np.asarray(values, np.float64), dtype="float64"), average=False, name=name
        )  # Horovod: sum over ranks

    def average_in_place(self, arrays: list[Any], name: str) -> None:
        """Replace each array by its mean over ranks (e.g. BatchNorm running statistics)."""
        import horovod.mxnet as hvd

        for i, array in enumerate(arrays):
            hvd.allreduce_(array, average=True, name=f"{name}.{i}")  # Horovod: mean over ranks

    def allgather_object(self, value: Any, name: str) -> list[Any]:
        import horovod.mxnet as hvd

        return list(hvd.allgather_object(value, name=name))  # Horovod: one value per rank

    def barrier(self) -> None:
        import horovod.mxnet as hvd

        hvd.allreduce(mx.nd.zeros(1), name="barrier").wait_to_read()  # Horovod: wait for all


def stall_environment(step_timeout: float, environ: MutableMapping[str, str]) -> None:
    """Horovod's own stall handling, from ``step_timeout`` (read by ``hvd.init()``).

    The coordinator warns, naming the missing ranks, after half the timeout and shuts
    Horovod down after the whole of it; Gloo's rendezvous and its collectives give up after
    it too. Values a user set in the environment win. 0 leaves Horovod's defaults.
    """
    if step_timeout <= 0:
        return
    seconds = max(1, int(step_timeout))
    environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, seconds // 2)))
    environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(seconds))
    environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(seconds))


def launcher_rank(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """This process's rank and the world size as the launcher announced them, before
    ``hvd.init()`` (which is where a worker that never joins leaves the others waiting)."""

    def first(*names: str) -> int | None:
        values = [environ[n] for n in names if environ.get(n, "").isdigit()]
        return int(values[0]) if values else None

    return (
        first("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK"),
        first("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE"),
    )


def init() -> Horovod:
    import horovod.mxnet as hvd

    hvd.init()  # Horovod: start the controller (MPI or Gloo)
    # Every rank says where it runs: under an operator, which pod holds which rank.
    log.info("rank %d of %d on %s", hvd.rank(), hvd.size(), socket.gethostname())
    return Horovod(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())
