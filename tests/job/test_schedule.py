"""The lr schedule, counted in epochs (images seen / images per epoch), not in steps."""

import math

import pytest

from job.config import Config
from job.training.rate import lr_at


def cfg(**kw):
    return Config(data="d", output="o", **kw)


def at_step(step, c, steps_per_epoch, workers):
    """The lr of 0-based step ``step`` of a run with ``steps_per_epoch``."""
    return lr_at(step / steps_per_epoch, c, workers, 1 / steps_per_epoch)


def test_warmup_rises_linearly_to_the_rate_scaled_by_workers():
    c = cfg(lr=0.1, warmup_epochs=1, epochs=10)
    rates = [at_step(s, c, steps_per_epoch=10, workers=4) for s in range(10)]
    assert rates == pytest.approx([0.4 * (s + 1) / 10 for s in range(10)])


def test_cosine_decays_from_peak_to_zero():
    c = cfg(lr=0.1, warmup_epochs=1, epochs=5, lr_schedule="cosine")
    steps = 10
    assert at_step(10, c, steps, 2) == pytest.approx(0.2)
    assert at_step(30, c, steps, 2) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert at_step(49, c, steps, 2) < 0.001
    rates = [at_step(s, c, steps, 2) for s in range(10, 50)]
    assert rates == sorted(rates, reverse=True)


def test_step_decay_multiplies_at_each_step_epoch():
    c = cfg(lr=0.1, warmup_epochs=0, epochs=10, lr_schedule="step", lr_steps=(3, 6), lr_decay=0.1)
    assert [at_step(e * 10, c, 10, 1) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_no_warmup_starts_at_the_peak():
    c = cfg(lr=0.05, warmup_epochs=0, epochs=2)
    assert at_step(0, c, 100, 3) == pytest.approx(0.15)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_the_same_fraction_of_training_has_the_same_rate_per_worker_on_any_world_size(schedule):
    """2 workers take 6 steps an epoch, 1 worker 12: step 8 of the one is step 16 of the other,
    and the rate differs only by the scaling with workers (the global batch halves too)."""
    c = cfg(lr=0.1, warmup_epochs=1.5, epochs=4, lr_schedule=schedule, lr_steps=(2, 3))
    for step in range(24):
        two = at_step(step, c, steps_per_epoch=6, workers=2)
        # Warmup rates a step by where it ends, decay by where it starts: the 1-worker step
        # that ends (starts) at the same place.
        one = at_step(2 * step + (step / 6 < c.warmup_epochs), c, steps_per_epoch=12, workers=1)
        assert two / 2 == pytest.approx(one)
