import math

import pytest

from job.config import Config
from job.train import lr_at


def cfg(**kw):
    return Config(data="d", output="o", **kw)


def test_warmup_rises_linearly_to_the_rate_scaled_by_workers():
    c = cfg(lr=0.1, warmup_epochs=1, epochs=10)
    rates = [lr_at(s, c, steps_per_epoch=10, workers=4) for s in range(10)]
    assert rates == pytest.approx([0.4 * (s + 1) / 10 for s in range(10)])


def test_cosine_decays_from_peak_to_zero():
    c = cfg(lr=0.1, warmup_epochs=1, epochs=5, lr_schedule="cosine")
    steps = 10
    assert lr_at(10, c, steps, 2) == pytest.approx(0.2)
    assert lr_at(30, c, steps, 2) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(49, c, steps, 2) < 0.001
    rates = [lr_at(s, c, steps, 2) for s in range(10, 50)]
    assert rates == sorted(rates, reverse=True)


def test_step_decay_multiplies_at_each_step_epoch():
    c = cfg(lr=0.1, warmup_epochs=0, epochs=10, lr_schedule="step", lr_steps=(3, 6), lr_decay=0.1)
    assert [lr_at(e * 10, c, 10, 1) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_no_warmup_starts_at_the_peak():
    c = cfg(lr=0.05, warmup_epochs=0, epochs=2)
    assert lr_at(0, c, 100, 3) == pytest.approx(0.15)
