"""Fixtures of the image tests: podman set up once, each flavour's image built once per session."""

from __future__ import annotations

import pytest
from podman_tools import build_cpu_image, build_flavour, podman_ready


@pytest.fixture(scope="session")
def podman() -> dict[str, str]:
    return podman_ready()


@pytest.fixture(scope="session")
def cpu_image(podman: dict[str, str]) -> str:
    return build_cpu_image(podman)


@pytest.fixture(scope="session")
def gpu_image(podman: dict[str, str]) -> str:
    return build_flavour(podman, "gpu")
