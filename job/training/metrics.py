"""Prometheus metrics of one worker, in an explicit registry.

Every worker serves ``/metrics`` on ``metrics_port + local_rank``; at the end each pushes
its registry to the Pushgateway (when configured) under the grouping key
``job="finetune-job", rank="<rank>"``, with a last-success timestamp or a failure marker,
for jobs that finish between scrapes.

Names follow Prometheus practice: prefix ``finetune_``, base units (``_seconds``,
``_bytes``), ``_total`` counters, ratios 0–1. Every ``finetune_*`` series carries ``rank``;
the only other labels are ``split`` (accuracy) and ``phase`` (step phases). The standard
``process_*`` series (prometheus-client's process collector) describe the worker process.
Throughput is ``rate(finetune_images_total[1m])``, not a gauge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from job.errors import InputError

log = logging.getLogger(__name__)

# A training step takes from ~1 ms (data wait, small model on GPU) to a minute (big model,
# CPU); web-latency buckets (5 ms–10 s) would lump every CPU step into the top bucket.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
PHASES = ("data", "compute", "allreduce")
SPLITS = ("train", "val", "val_tta")
PUSH_JOB = "finetune-job"


class DataStatsCollector(Collector):
    """Exposes the input pipeline's counts (kept as plain ints by the data threads)."""

    COUNTERS = (
        ("finetune_read_bytes", "bytes_read", "Bytes of records read from storage (S3 or local)."),
        ("finetune_read_retries", "read_retries", "Reads resumed after a dropped stream."),
        ("finetune_read_errors", "read_errors", "Reads that failed after all retries."),
        (
            "finetune_corrupt_records",
            "corrupt_records",
            "Distinct corrupt records this rank skipped (not trained), each counted once per "
            "job: reading it again in a later epoch or after a restart does not count again.",
        ),
        (
            "finetune_checksum_mismatches",
            "checksum_mismatches",
            "Shards whose sha256 differs from the manifest.",
        ),
    )

    def __init__(self, stats: Any, rank: str) -> None:
        self.stats, self.rank = stats, rank

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, attr, doc in self.COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["rank"])
            family.add_metric([self.rank], getattr(self.stats, attr))
            yield family


class Metrics:
    """The metrics of one worker; ``rank`` labels every series."""

    def __init__(self, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rank = str(rank)
        r, rank_ = self.registry, ["rank"]
        # A child, so `.info({...})` sets the facts of this rank.
        self.info = Info(
            "finetune_build",
            "Static facts of the run: model, workers, batch_size (per worker), version.",
            rank_,
            registry=r,
        ).labels(self.rank)
        self.images = Counter("finetune_images", "Training images processed.", rank_, registry=r)
        self.steps = Counter("finetune_steps", "Optimizer steps taken.", rank_, registry=r)
        self.epoch = Gauge("finetune_epoch", "Epoch in progress (0-based).", rank_, registry=r)
        self.loss = Gauge(
            "finetune_train_loss",
            "Training loss over the last log interval, averaged over ranks (NaN: diverged).",
            rank_,
            registry=r,
        )
        self.accuracy = Gauge(
            "finetune_accuracy",
            "Top-1 accuracy as a ratio 0-1; split: train (last log interval), val "
            "(center crop, last epoch) or val_tta (five-crop average).",
            ["rank", "split"],
            registry=r,
        )
        self.lr = Gauge(
            "finetune_learning_rate",
            "Learning rate of the last step (scaled by workers, after warmup and decay).",
            rank_,
            registry=r,
        )
        self.step_seconds = Histogram(
            "finetune_step_seconds",
            "Wall time of one training step (the sum of its phases), sampled: one step per "
            "log interval runs with device syncs around its phases and is observed here.",
            rank_,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "finetune_step_phase_seconds",
            "Time of one step spent per phase: data (waiting for the batch), compute "
            "(forward+backward), allreduce (gradient allreduce and optimizer update); sampled "
            "on the same steps as finetune_step_seconds.",
            ["rank", "phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "finetune_checkpoint_seconds",
            "Time to write a checkpoint and check what storage holds (rank 0 only; on a "
            "background thread while training goes on, unless async_checkpoints is off).",
            rank_,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_stall = Histogram(
            "finetune_checkpoint_stall_seconds",
            "Time training waited for a checkpoint (rank 0 only): the copy into memory, and "
            "the write still in flight when an epoch ends or SIGTERM comes.",
            rank_,
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.checkpoint_deferred = Counter(
            "finetune_checkpoints_deferred_total",
            "Interval checkpoints that fell due while the last one was still being written "
            "(rank 0 only); each is taken once that write ends.",
            rank_,
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "finetune_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written (rank 0 only).",
            rank_,
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "finetune_gpu_memory_used_bytes",
            "Memory in use on this worker's GPU (only when training on a GPU).",
            rank_,
            registry=r,
        )
        self.gpu_memory_capacity = Gauge(
            "finetune_gpu_memory_capacity_bytes",
            "Memory of this worker's GPU (only when training on a GPU).",
            rank_,
            registry=r,
        )
        self.last_success = Gauge(
            "finetune_last_success_timestamp_seconds",
            "Unix time the run finished successfully (set in the final push only).",
            rank_,
            registry=r,
        )
        self.failed = Gauge(
            "finetune_failed",
            "1 when the run ended in failure, 0 when it succeeded (set in the final push only).",
            rank_,
            registry=r,
        )
        self.seconds_since_step = Gauge(
            "finetune_seconds_since_last_step",
            "Seconds since this rank last completed a step (a training or evaluation batch; "
            "counted from the start before the first). The watchdog exits at "
            "finetune_step_timeout_seconds.",
            rank_,
            registry=r,
        )
        self.step_timeout = Gauge(
            "finetune_step_timeout_seconds",
            "The run's step_timeout: a rank with no step for this long exits (0: no watchdog).",
            rank_,
            registry=r,
        )
        self.progress = Gauge(
            "finetune_progress_ratio",
            "Share of the run's training steps done, 0-1 (all epochs).",
            rank_,
            registry=r,
        )
        self.eta = Gauge(
            "finetune_eta_seconds",
            "Estimated seconds until the run's last step, at the pace measured so far "
            "(NaN until two reports measured it).",
            rank_,
            registry=r,
        )
        # The standard process_* series (CPU seconds, resident memory, open fds, start time).
        ProcessCollector(registry=r)
        self._server: Any = None

    def watch_data(self, stats: Any) -> None:
        self.registry.register(DataStatsCollector(stats, self.rank))

    def serve(self, address: str, port: int) -> int:
        """Start ``/metrics`` on a daemon thread; returns the bound port."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        except (OSError, OverflowError) as e:  # OverflowError: port + local rank > 65535
            reason = getattr(e, "strerror", None) or e
            raise InputError(
                f"metrics_port: cannot serve /metrics on {address}:{port}: {reason}"
            ) from e
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def watch_steps(self, seconds_since_step: Callable[[], float], timeout: float) -> None:
        """The watchdog's clock, read at every scrape (and at the final push)."""
        self.seconds_since_step.labels(self.rank).set_function(seconds_since_step)
        self.step_timeout.labels(self.rank).set(timeout)

    # Feeding, from the training loop.
    def step(self, images: int) -> None:
        self.images.labels(self.rank).inc(images)
        self.steps.labels(self.rank).inc()

    def phases(self, data_s: float, compute_s: float, allreduce_s: float) -> None:
        """A sampled step's phase times (measured with device syncs between the phases)."""
        self.step_seconds.labels(self.rank).observe(data_s + compute_s + allreduce_s)
        for phase, seconds in zip(PHASES, (data_s, compute_s, allreduce_s), strict=True):
            self.phase_seconds.labels(self.rank, phase).observe(seconds)

    def set_progress(self, ratio: float, eta_seconds: float | None) -> None:
        self.progress.labels(self.rank).set(ratio)
        self.eta.labels(self.rank).set(float("nan") if eta_seconds is None else eta_seconds)

    def set_accuracy(self, split: str, value: float) -> None:
        if split not in SPLITS:
            raise ValueError(f"accuracy split {split!r} is not one of {SPLITS}")
        self.accuracy.labels(self.rank, split).set(value)

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_seconds.labels(self.rank).observe(seconds)
        self.last_checkpoint.labels(self.rank).set_to_current_time()

    def observe_gpu_memory(self, ctx: Any) -> None:
        """GPU memory of ``ctx`` (an ``mx.Context``); nothing on a CPU."""
        if ctx.device_type != "gpu":
            return
        import mxnet as mx

        free, total = mx.context.gpu_memory_info(ctx.device_id)
        self.gpu_memory_used.labels(self.rank).set(total - free)
        self.gpu_memory_capacity.labels(self.rank).set(total)

    def push(
        self,
        url: str,
        success: bool,
        job: str = PUSH_JOB,
        auth: tuple[str, str] | None = None,
    ) -> None:
        """Replace this rank's group on a Pushgateway with the final metrics and an outcome
        marker; a failed push is only logged (the run's outcome must not depend on it).
        ``auth``: (user, password) for HTTP basic auth, from :func:`read_basic_auth`."""
        from prometheus_client import push_to_gateway
        from prometheus_client.exposition import basic_auth_handler, default_handler

        if success:
            self.last_success.labels(self.rank).set_to_current_time()
        self.failed.labels(self.rank).set(0 if success else 1)
        try:
            push_to_gateway(
                url,
                job=job,
                grouping_key={"rank": self.rank},
                registry=self.registry,
                timeout=10,
                handler=default_handler if auth is None else _with_auth(basic_auth_handler, auth),
            )
        except OSError as e:
            log.warning("pushgateway %s: push failed: %s", url, e)


def read_basic_auth(username_file: str, password_file: str) -> tuple[str, str] | None:
    """Pushgateway basic-auth credentials from two mounted Secret files (None when not set).

    Read once at start, so a missing file fails the run before training, naming the file
    and never its content; a trailing newline (``echo secret > file``) is not part of it.
    """
    if not username_file:
        return None
    values = []
    for path in (username_file, password_file):
        try:
            with open(path, encoding="utf-8") as fh:
                values.append(fh.read().rstrip("\r\n"))
        except OSError as e:
            raise InputError(f"pushgateway credentials file {path}: {e.strerror}") from e
    return values[0], values[1]


def _with_auth(handler: Any, auth: tuple[str, str]) -> Any:
    """prometheus-client's ``basic_auth_handler`` bound to ``auth``."""

    def handle(url: str, method: str, timeout: Any, headers: Any, data: bytes) -> Any:
        return handler(url, method, timeout, headers, data, auth[0], auth[1])

    return handle
