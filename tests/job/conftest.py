"""Fixtures of tests/job: one finished training run that the output tests read."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def finished_run(tiny_dataset, tmp_path_factory, make_config) -> tuple[str, dict]:
    """A 2-epoch resnet18_v2 run on `tiny_dataset` with every output (the uint8 ONNX
    variant too): (OUTPUT, summary)."""
    from job.training import lifecycle

    out = str(tmp_path_factory.mktemp("finished") / "run")
    summary = lifecycle.run(make_config(tiny_dataset, out, onnx_preprocess=True))
    return out, summary
