"""Fixtures of the examples' tests: the real `helm` CLI, as the chart tests find it."""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_tools import find_or_install_helm, run_helm


@pytest.fixture(scope="session")
def helm() -> Path:
    path = find_or_install_helm()
    run_helm(path, "version", "--short")
    return path
