"""Fixtures shared by the whole suite: small generated datasets and a launcher environment."""

from __future__ import annotations

import logging
import os
import sys

import pytest

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def launch_env() -> dict[str, str]:
    """Environment for `finetune-job`, `horovodrun` and `mpirun` subprocesses."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_mpi_yield_when_idle="1",
        PYTHONUNBUFFERED="1",
    )
    for var in list(env):  # config must come from each test's own flags
        if var.startswith("FINETUNE_"):
            del env[var]
    return env


@pytest.fixture(scope="session")
def shape_images(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image folder of 3 easy classes (shape and colour go together), 40 JPEGs each."""
    from job.demo import SOURCE_SHAPES, draw_dataset

    colours = {"circle": (40, 40, 240), "cross": (40, 240, 40), "triangle": (240, 40, 40)}
    shapes = {k: SOURCE_SHAPES[k] for k in colours}
    return draw_dataset(
        str(tmp_path_factory.mktemp("images")), shapes, per_class=40, size=44, colours=colours
    )


@pytest.fixture(scope="session")
def tiny_dataset(shape_images: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`shape_images` prepared into RecordIO shards of 25 records (shorter side 36)."""
    from job.prepare import prepare
    from job.storage import Storage

    root = str(tmp_path_factory.mktemp("dataset"))
    prepare(shape_images, root, Storage(), resize=36, val_fraction=0.2, shard_size=25, workers=2)
    return root


@pytest.fixture(autouse=True)
def _quiet_werkzeug() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
