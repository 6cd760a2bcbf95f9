"""Rank 0's progress output, one update per log interval.

- ``text`` on a terminal: a progress bar redrawn in place (``\r``), a line per epoch.
- ``text`` otherwise (a pipe, a pod's log): one line per interval with units, e.g.
  ``12:00:01 epoch 1/5 step 20/120 loss 1.2345 train_top1 0.412 412.3 img/s lr 0.02
  data-wait 3%``.
- ``json``: one object per line (``event`` is ``step`` or ``epoch``), on a terminal too.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

BAR_WIDTH = 30


class ProgressLog:
    def __init__(self, enabled: bool, fmt: str, stream: IO[str]) -> None:
        self.enabled, self.fmt, self.stream = enabled, fmt, stream
        self.bar = enabled and fmt == "text" and stream.isatty()

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
        if not self.enabled:
            return
        if self.bar:
            done = int(BAR_WIDTH * batch / steps)
            self.stream.write(
                f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (BAR_WIDTH - done)}] "
                f"{batch}/{steps} loss {loss:.4f} acc {acc:.3f} "
                f"{images_per_second:.1f} img/s lr {lr:.4g} data-wait {100 * data_share:.0f}%"
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
        }
        self._line(
            fields,
            f"epoch {epoch}/{epochs} step {batch}/{steps} loss {loss:.4f} "
            f"train_top1 {acc:.3f} {images_per_second:.1f} img/s lr {lr:.4g} "
            f"data-wait {100 * data_share:.0f}%",
        )

    def epoch(self, record: dict[str, Any], epochs: int) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.stream.write("\n")
        parts = [f"{k} {v}" for k, v in record.items() if k != "epoch"]
        self._line(
            {"event": "epoch", **record},
            f"epoch {record['epoch']}/{epochs} done: " + ", ".join(parts),
        )

    def _line(self, fields: dict[str, Any], text: str) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")
        else:
            self.stream.write(time.strftime("%H:%M:%S ") + text + "\n")
        self.stream.flush()
