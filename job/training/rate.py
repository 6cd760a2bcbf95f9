"""The learning rate of every step: scaled by the workers, warmed up, then decayed."""

from __future__ import annotations

import math

from job.config import Config


def scaled_lr(cfg: Config, workers: int) -> float:
    """The scaling rule: the per-worker rate times the workers (the global batch grows so)."""
    return cfg.lr * workers


def lr_at(position: float, cfg: Config, workers: int, step_epochs: float) -> float:
    """Learning rate of the step that starts ``position`` epochs into training (2.5: halfway
    through the third epoch) and covers ``step_epochs`` of an epoch.

    Counted in epochs (images seen / images per epoch), not steps: steps per epoch change
    with the number of workers, and a job resumed on another number keeps its place.
    1. Scale: the per-worker rate times the number of workers (the global batch grows so).
    2. Warmup: linear from ~0 to the scaled rate over ``warmup_epochs``.
    3. Decay: cosine to 0 at the end, or ×``lr_decay`` at each of ``lr_steps``.
    """
    peak = scaled_lr(cfg, workers)
    if position < cfg.warmup_epochs:
        return peak * min(1.0, (position + step_epochs) / cfg.warmup_epochs)
    if cfg.lr_schedule == "step":
        passed = sum(1 for e in cfg.lr_steps if position >= e - 1e-9)
        return peak * cfg.lr_decay**passed
    span = max(step_epochs, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (position - cfg.warmup_epochs) / span)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
