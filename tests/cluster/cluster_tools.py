"""Helpers of the tests against the local cluster: helm, run values, bounded polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from chart_tools import CHART

# Annotations the cluster's kwok stages read (deploy/localcluster/kwok-stages.yaml).
HOLD = "finetune-job.local/hold"
FAIL = "finetune-job.local/fail"
# The chart's required values, for a run that kwok plays (nothing is read or written).
TRAINING = {"data": "s3://datasets/flowers", "output": "s3://runs/flowers"}
WAIT_SECONDS = 120.0

# helm("install", "r", "-n", ns, values={...}, files=(...)): the `helm` fixture.
Helm = Callable[..., str]


def install(
    helm: Helm,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    files: tuple[Path, ...] = (),
) -> list[dict[str, Any]]:
    """`helm install` of the chart; the objects it made (its manifest)."""
    helm("install", release, str(CHART), "-n", namespace, values=values, files=files)
    return [
        doc for doc in yaml.safe_load_all(helm("get", "manifest", release, "-n", namespace)) if doc
    ]


def run_values(**extra: Any) -> dict[str, Any]:
    """Values of a small run on the kwok nodes (requests they can fit)."""
    values: dict[str, Any] = {
        "training": dict(TRAINING),
        "workers": {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def eventually(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    """Poll until ``check`` returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.25)
