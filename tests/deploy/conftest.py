"""Fixtures of the deploy tests: a fake API server with a kubeconfig, a client on it, helm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, kubeconfig

from deploy.client import MPIJobClient

# The chart tests' helpers (render with the real helm, CRD validation) are shared through
# pytest's pythonpath (pyproject.toml), not copied.

NAMESPACE = "team-a"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def kubeconfig_path(api: FakeApiServer, tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(kubeconfig(api.url, NAMESPACE), encoding="utf-8")
    return str(path)


@pytest.fixture
def client(kubeconfig_path: str) -> MPIJobClient:
    return MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5)


@pytest.fixture(scope="session")
def helm() -> Path:
    from chart_tools import find_or_install_helm, run_helm

    path = find_or_install_helm()
    run_helm(path, "version", "--short")
    return path
