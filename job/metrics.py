"""Prometheus metrics of one worker, in an explicit registry.

Every worker serves ``/metrics`` on ``metrics_port + local_rank``; at the end each pushes
its registry to the Pushgateway (when configured) with a last-success timestamp or a
failure marker, for jobs that finish between scrapes. Names follow Prometheus practice:
prefix ``finetune_``, base units, ``_total`` counters, ratios 0–1; labels are only
``rank``, ``split`` and ``phase``. Throughput is ``rate(finetune_images_total[1m])``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# A training step takes from ~10 ms (small model, GPU) to tens of seconds (big model, CPU).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PHASES = ("data", "compute", "allreduce")


class DataStatsCollector(Collector):
    """Exposes the input pipeline's counts (kept as plain ints by the data threads)."""

    def __init__(self, stats: Any, rank: str) -> None:
        self.stats, self.rank = stats, rank

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, attr, doc in (
            (
                "finetune_read_bytes",
                "bytes_read",
                "Bytes of records read from storage (S3 or local).",
            ),
            ("finetune_read_retries", "read_retries", "Reads resumed after a dropped stream."),
            ("finetune_read_errors", "read_errors", "Reads that failed after all retries."),
            ("finetune_corrupt_records", "corrupt_records", "Corrupt records skipped."),
        ):
            family = CounterMetricFamily(name, doc, labels=["rank"])
            family.add_metric([self.rank], getattr(self.stats, attr))
            yield family


class Metrics:
    def __init__(self, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rank = str(rank)
        r, labels = self.registry, ["rank"]
        self.info = Info("finetune_build", "Static facts of the run.", registry=r)
        self.images = Counter("finetune_images", "Training images processed.", labels, registry=r)
        self.steps = Counter("finetune_steps", "Optimizer steps taken.", labels, registry=r)
        self.epoch = Gauge("finetune_epoch", "Epoch in progress (0-based).", labels, registry=r)
        self.loss = Gauge(
            "finetune_train_loss",
            "Training loss over the last log interval, averaged over ranks.",
            labels,
            registry=r,
        )
        self.accuracy = Gauge(
            "finetune_accuracy",
            "Top-1 accuracy (0-1); split is train, val or val_tta.",
            ["rank", "split"],
            registry=r,
        )
        self.lr = Gauge(
            "finetune_learning_rate",
            "Current learning rate (scaled by workers).",
            labels,
            registry=r,
        )
        self.step_seconds = Histogram(
            "finetune_step_seconds",
            "Wall time of one training step.",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "finetune_step_phase_seconds",
            "Time of one step spent per phase: data (waiting for "
            "the batch), compute (forward+backward), allreduce (allreduce+update).",
            ["rank", "phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "finetune_checkpoint_seconds",
            "Time to write a checkpoint.",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "finetune_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written.",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "finetune_gpu_memory_bytes", "GPU memory in use by this worker.", labels, registry=r
        )
        self.last_success = Gauge(
            "finetune_last_success_timestamp_seconds",
            "Unix time the job last finished successfully.",
            registry=r,
        )
        self.failed = Gauge("finetune_failed", "1 when the job ended in failure.", registry=r)
        self._server: Any = None

    def watch_data(self, stats: Any) -> None:
        self.registry.register(DataStatsCollector(stats, self.rank))

    def serve(self, address: str, port: int) -> int:
        """Start ``/metrics``; returns the bound port (``port`` 0 is not asked for here)."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def step(self, images: int, data_s: float, compute_s: float, allreduce_s: float) -> None:
        self.images.labels(self.rank).inc(images)
        self.steps.labels(self.rank).inc()
        self.step_seconds.labels(self.rank).observe(data_s + compute_s + allreduce_s)
        for phase, seconds in zip(PHASES, (data_s, compute_s, allreduce_s), strict=True):
            self.phase_seconds.labels(self.rank, phase).observe(seconds)

    def set_accuracy(self, split: str, value: float) -> None:
        self.accuracy.labels(self.rank, split).set(value)

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint.set(time.time())

    def push(self, url: str, success: bool) -> None:
        """Push this worker's registry to a Pushgateway; a failed push is only logged."""
        from prometheus_client import push_to_gateway

        if success:
            self.last_success.set(time.time())
        self.failed.set(0 if success else 1)
        try:
            push_to_gateway(
                url,
                job="finetune-job",
                grouping_key={"rank": self.rank},
                registry=self.registry,
                timeout=10,
            )
        except OSError as e:
            log.warning("pushgateway %s: push failed: %s", url, e)
