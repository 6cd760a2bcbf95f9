"""Rank 0's progress output, one update per log interval, with the ETA of the whole run.

- ``text`` on a terminal: a progress bar redrawn in place (``\\r``), a line per epoch.
- ``text`` otherwise (a pipe, a pod's log): one line per interval with units, e.g.
  ``2026-12-03T07:50:00.123Z INFO epoch 1/5 step 20/120 loss 1.2345 train_top1 0.412
  412.3 img/s lr 0.02 data-wait 3% ETA 12m05s``.
- ``json``: one object per line (``event`` is ``step`` or ``epoch``), on a terminal too,
  in the same format as every other log line (job/logs.py).

At the end of every epoch rank 0 also prints one metrics line on **stdout**, the timestamp
first, then ``name=value`` pairs, for tools that scrape a trial's output with a regex
(Katib's StdOut metrics collector, SageMaker metric definitions)::

    2026-12-03T07:50:00.123Z epoch=1 train_loss=1.1 train_top1=0.45 val_top1=0.5 lr=0.02 \
        images_per_second=412.3        (one line)

The ETA and the run's completed share come from what the loop already reports (epoch, batch,
steps per epoch): steps left over the run × wall time per step measured since the first
report of this process (evaluation and checkpoints included, so it is the run's pace).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from job import logs

BAR_WIDTH = 30
# The keys of the metrics line, in order; the ones a record lacks are left out.
METRIC_KEYS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_second",
)


class Eta:
    """Completed share (0-1) and seconds left of a run of ``total`` steps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._first: tuple[float, int] | None = None  # (time, steps done) at the first update

    def update(self, done: int, total: int) -> tuple[float, float | None]:
        """(ratio, seconds left); seconds left is None until two updates measured a pace."""
        now = self.clock()
        ratio = min(1.0, done / max(total, 1))
        if done >= total:
            return 1.0, 0.0
        if self._first is None:
            self._first = (now, done)
            return ratio, None
        started, done_then = self._first
        if done <= done_then or now <= started:
            return ratio, None
        seconds_per_step = (now - started) / (done - done_then)
        return ratio, (total - done) * seconds_per_step


class ProgressLog:
    """Progress of the run: lines (or a bar) on rank 0, the progress gauges on every rank.

    ``on_progress(ratio, eta_seconds)`` is called on every rank at every report (the
    ``finetune_progress_ratio`` / ``finetune_eta_seconds`` gauges); ``metrics_stream`` gets
    the epoch metrics lines.
    """

    def __init__(
        self,
        enabled: bool,
        fmt: str,
        stream: IO[str],
        *,
        metrics_stream: IO[str] | None = None,
        on_progress: Callable[[float, float | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled, self.fmt, self.stream = enabled, fmt, stream
        self.metrics_stream = metrics_stream or sys.stdout
        self.bar = enabled and fmt == "text" and stream.isatty()
        self.on_progress = on_progress
        self.eta = Eta(clock)
        self.eta_seconds: float | None = None
        self.last_lr: float | None = None

    def step(
        self,
        *,
        epoch: int,
        epochs: int,
        batch: int,
        steps: int,
        loss: float,
        acc: float,
        lr: float,
        images_per_second: float,
        data_share: float,
    ) -> None:
        ratio, self.eta_seconds = self.eta.update((epoch - 1) * steps + batch, epochs * steps)
        self.last_lr = lr
        if self.on_progress is not None:
            self.on_progress(ratio, self.eta_seconds)
        if not self.enabled:
            return
        eta = logs.duration(self.eta_seconds)
        if self.bar:
            done = int(BAR_WIDTH * batch / steps)
            self.stream.write(
                f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (BAR_WIDTH - done)}] "
                f"{batch}/{steps} loss {loss:.4f} acc {acc:.3f} "
                f"{images_per_second:.1f} img/s lr {lr:.4g} data-wait {100 * data_share:.0f}% "
                f"ETA {eta}"
                "\x1b[K"  # clear what a longer previous line left
            )
            self.stream.flush()
            return
        fields = {
            "event": "step",
            "epoch": epoch,
            "epochs": epochs,
            "step": batch,
            "steps": steps,
            "loss": round(loss, 5),
            "train_top1": round(acc, 5),
            "images_per_second": round(images_per_second, 1),
            "lr": float(f"{lr:.6g}"),
            "data_wait_share": round(data_share, 3),
            "progress_ratio": round(ratio, 4),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }
        self._line(
            fields,
            f"epoch {epoch}/{epochs} step {batch}/{steps} loss {loss:.4f} "
            f"train_top1 {acc:.3f} {images_per_second:.1f} img/s lr {lr:.4g} "
            f"data-wait {100 * data_share:.0f}% ETA {eta}",
        )

    def epoch(self, record: dict[str, Any], epochs: int) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.stream.write("\n")
        parts = [f"{k} {v}" for k, v in record.items() if k != "epoch"]
        eta = None if self.eta_seconds is None else round(self.eta_seconds, 1)
        self._line(
            {"event": "epoch", **record, "eta_seconds": eta},
            f"epoch {record['epoch']}/{epochs} done: "
            + ", ".join(parts)
            + f"; ETA {logs.duration(self.eta_seconds)}",
        )
        self.metrics_stream.write(self.metrics_line(record) + "\n")
        self.metrics_stream.flush()

    def metrics_line(self, record: dict[str, Any], now: float | None = None) -> str:
        """``<RFC 3339 UTC> epoch=1 train_loss=... `` from an epoch record (plus the last lr)."""
        values = {"lr": self.last_lr, **record}
        pairs = [f"{k}={_number(values[k])}" for k in METRIC_KEYS if values.get(k) is not None]
        return " ".join([logs.rfc3339(time.time() if now is None else now), *pairs])

    def _line(self, fields: dict[str, Any], text: str) -> None:
        self.stream.write(logs.render(self.fmt, text, fields) + "\n")
        self.stream.flush()


def _number(value: Any) -> str:
    # Plain decimals, never a repr like 1e-05 that a naive regex splits (Katib's accepts
    # exponents, a SageMaker regex such as [0-9.]+ does not).
    if isinstance(value, float):
        return f"{value:.10f}".rstrip("0").rstrip(".") if value == value else "nan"
    return str(value)


class CountProgress:
    """Progress of a job of ``total`` items (``prepare``): a line redrawn in place on a
    terminal, otherwise a log line every ``interval`` seconds; images/s and ETA in both."""

    def __init__(
        self,
        total: int,
        what: str,
        stream: IO[str],
        log: Callable[[str], None],
        *,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what, self.stream, self.log = total, what, stream, log
        self.interval, self.clock = interval, clock
        self.tty = stream.isatty()
        self.done = 0
        self.started = self._shown = clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        # A terminal is redrawn at most 5 times a second; a log gets a line per interval.
        if now - self._shown >= (0.2 if self.tty else self.interval):
            self._shown = now
            self._show(now)

    def finish(self) -> None:
        if self.tty:
            self._show(self.clock())
            self.stream.write("\n")
            self.stream.flush()

    def rate_and_eta(self, now: float) -> tuple[float, float | None]:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return rate, eta

    def _show(self, now: float) -> None:
        rate, eta = self.rate_and_eta(now)
        text = (
            f"{self.done}/{self.total} {self.what} ({100 * self.done / max(self.total, 1):.0f}%) "
            f"{rate:.1f} {self.what}/s ETA {logs.duration(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
        else:
            self.log(text)
