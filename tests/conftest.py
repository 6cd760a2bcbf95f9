"""Fixtures shared by the whole suite: small generated datasets and a launcher environment."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence

import pytest

VENV_BIN = os.path.dirname(sys.executable)


# A small, fast training run: 32-pixel images, batches of 8, two epochs, fresh weights, no
# metrics port. Tests override what they are about.
SMALL_RUN = dict(
    pretrained="none",
    head_lr_mult=1.0,
    image_size=32,
    batch_size=8,
    epochs=2,
    lr=0.01,
    warmup_epochs=0.5,
    metrics_port=0,
    log_interval=2,
    data_workers=2,
)


@pytest.fixture(scope="session")
def make_config():
    """The one builder of a training Config in the tests: ``make_config(data, output,
    **overrides)``, a SMALL_RUN on ``data`` (a dataset root; "" with ``synthetic=True``)
    into ``output``."""
    from job.config import Config

    def build(data: str, output: object, **overrides: object) -> Config:
        return Config(**{**SMALL_RUN, "data": data, "output": str(output), **overrides})

    return build


@pytest.fixture(scope="session")
def launchers() -> dict[str, list[str]]:
    """2-process launch lines: the MPI Operator's mpirun line (RECIPES.md) with this machine as
    both hosts, and horovodrun."""
    return {
        "mpirun": (
            "mpirun -np 2 -H localhost:2 -bind-to none -map-by slot -x LD_LIBRARY_PATH -x PATH "
            "-mca pml ob1 -mca btl ^openib"
        ).split(),
        "horovodrun": "horovodrun -np 2 -H localhost:2".split(),
    }


@pytest.fixture(scope="session")
def train_on_two(launchers):
    """``train_on_two(launcher, *flags, prefix=())``: `finetune-job train FLAGS` as two
    processes under ``launcher`` ("mpirun" or "horovodrun"), with ``prefix`` run before the
    job on every rank. Run it with ``launch_env``."""

    def command(launcher: str, *flags: str, prefix: Sequence[str] = ()) -> list[str]:
        return [*launchers[launcher], *prefix, "finetune-job", "train", *flags]

    return command


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
    from job.input.prepare import prepare
    from job.storage import Storage

    root = str(tmp_path_factory.mktemp("dataset"))
    prepare(shape_images, root, Storage(), resize=36, val_fraction=0.2, shard_size=25, workers=2)
    return root


@pytest.fixture(autouse=True)
def _quiet_werkzeug() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in-process (``job.cli.main``) sets up logging for the whole process;
    the next test must not inherit its handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups on a link-local address
}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP: moto's server on 127.0.0.1 (a free port), with test
    credentials in this process's environment (the standard AWS chain reads them)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for var, value in S3_TEST_ENV.items():
            mp.setenv(var, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client, request) -> str:
    """A new, empty bucket for one test, as ``s3://name``."""
    import re

    name = (
        re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
        + "-"
        + str(len(s3_client.list_buckets()["Buckets"]))
    )
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_env(s3_server) -> dict[str, str]:
    """What a subprocess needs to reach the test S3 server through the standard variables."""
    return dict(S3_TEST_ENV, AWS_ENDPOINT_URL=s3_server)


def upload_tree(local_root: str, uri: str, storage) -> None:
    """Copy a prepared dataset folder to ``uri``, manifest last."""
    files = sorted(
        os.path.relpath(os.path.join(d, f), local_root)
        for d, _, fs in os.walk(local_root)
        for f in fs
    )
    for rel in sorted(files, key=lambda r: r == "manifest.json"):
        storage.upload(os.path.join(local_root, rel), f"{uri}/{rel}")


@pytest.fixture
def s3_upload(s3_server):
    """``s3_upload(local_dataset, s3_uri)`` copies a prepared dataset into S3."""
    from job.storage import S3Settings, Storage

    storage = Storage(S3Settings(endpoint_url=s3_server))
    return lambda local_root, uri: upload_tree(local_root, uri, storage)
