"""Fixtures of tests/job: one finished training run that the output tests read."""

from __future__ import annotations

import pytest


def small_config(data: str, output: str, **kw):
    from job.config import Config

    base = dict(
        data=data,
        output=output,
        pretrained="none",
        head_lr_mult=1.0,
        image_size=32,
        batch_size=8,
        epochs=2,
        lr=0.01,
        warmup_epochs=0.5,
        metrics_port=0,
        log_interval=6,
        data_workers=2,
    )
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="session")
def finished_run(tiny_dataset, tmp_path_factory) -> tuple[str, dict]:
    """A 2-epoch resnet18_v2 run on `tiny_dataset` with every output (the uint8 ONNX
    variant too): (OUTPUT, summary)."""
    from job.training import lifecycle

    out = str(tmp_path_factory.mktemp("finished") / "run")
    summary = lifecycle.run(small_config(tiny_dataset, out, onnx_preprocess=True))
    return out, summary
