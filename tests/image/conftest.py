"""Fixtures of the image tests: podman set up once, the CPU image built once per session."""

from __future__ import annotations

import pytest
from podman_tools import build_cpu_image, podman_ready


@pytest.fixture(scope="session")
def podman() -> dict[str, str]:
    return podman_ready()


@pytest.fixture(scope="session")
def cpu_image(podman: dict[str, str]) -> str:
    return build_cpu_image(podman)
