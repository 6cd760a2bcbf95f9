"""Fixtures of the image tests: podman set up once, the CPU image built once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from podman_tools import (
    BUILDER_TAG,
    CPU_BUILD_ARGS,
    IMAGE,
    build,
    ensure_base_image,
    ensure_tools,
    podman_env,
    run,
)


@pytest.fixture(scope="session")
def podman() -> dict[str, str]:
    reason = ensure_tools()
    if reason:
        pytest.skip(reason)
    env = podman_env()
    ensure_base_image(env)
    return env


@pytest.fixture(scope="session")
def cpu_image(podman: dict[str, str]) -> Iterator[str]:
    # The builder stage gets a tag of its own so that pruning untagged leftovers of earlier
    # builds keeps its cache (the Horovod compile); only layers no build refers to go.
    seconds = build(podman, CPU_BUILD_ARGS, BUILDER_TAG, target="builder")
    seconds += build(podman, CPU_BUILD_ARGS, IMAGE)
    run(["podman", "image", "prune", "-f"], podman, check=False)
    size = run(["podman", "image", "ls", "--format", "{{.Size}}", IMAGE], podman).stdout.strip()
    print(f"\nbuilt {IMAGE} in {seconds:.0f} s; size {size}")
    yield IMAGE
