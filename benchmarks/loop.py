"""Training-loop benchmarks (issue: lose nothing, waste nothing). One command each:

    python benchmarks/loop.py p2   # loop efficiency: full job img/s ÷ compute-only img/s
    python benchmarks/loop.py p3   # scaling: 2 processes × 1 thread ÷ 1 process × 1 thread
    python benchmarks/loop.py p5   # seconds from launch to the first training step, 2 workers
    python benchmarks/loop.py p6   # peak RSS per worker
    python benchmarks/loop.py all

resnet18_v2, batch 32 per process, 224² inputs, on this machine's CPU cores. Each prints the
numbers it compares side by side, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
FINETUNE = os.path.join(BIN, "finetune-job")
MODEL, BATCH, SIZE = "resnet18_v2", 32, 224


def env(threads: int | None = None, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_mpi_yield_when_idle="1",
        PYTHONUNBUFFERED="1",
    )
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    e.update(extra)
    return e


def train_command(out: str, args: list[str], launcher: list[str] | None = None) -> list[str]:
    base = (
        f"--output {out} --model {MODEL} --batch-size {BATCH} --image-size {SIZE} --pretrained none"
    )
    return [*(launcher or []), FINETUNE, "train", *base.split(), *args]


def train(args: list[str], launcher: list[str] | None = None, **env_kw: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cmd = train_command(out, ["--log-interval", "1000", *args], launcher)
        subprocess.run(
            cmd, check=True, env=env(**env_kw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with open(os.path.join(out, "summary.json")) as fh:
            return json.load(fh)


def steady_rate(summary: dict) -> float:
    """Images/s of the last epoch (the first one pays for graph building and warm-up)."""
    return float(summary["history"][-1]["images_per_second"])


def compute_only(steps: int, threads: int) -> float:
    """The limit: forward, backward and update of the hybridized model on one in-memory batch."""
    code = f"""
import time, mxnet as mx
from mxnet import autograd, gluon
from job.training.model import build
from job.config import Config
from job.storage import Storage
cfg = Config(output="x", synthetic=True, model="{MODEL}", pretrained="none", image_size={SIZE})
net = build(cfg, 10, mx.cpu(), Storage())
trainer = gluon.Trainer(net.collect_params(), "sgd", {{"learning_rate": 0.01, "momentum": 0.9}})
loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
x, y = mx.nd.random.normal(shape=({BATCH}, 3, {SIZE}, {SIZE})), mx.nd.zeros({BATCH})
def step():
    x.attach_grad()
    with autograd.record():
        loss = loss_fn(net(x), y)
    loss.backward()
    trainer.step({BATCH})
for _ in range(3):
    step()
mx.nd.waitall()
t = time.perf_counter()
for _ in range({steps}):
    step()
mx.nd.waitall()
print({BATCH} * {steps} / (time.perf_counter() - t))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env(threads)
    )
    return float(out.stdout.strip().splitlines()[-1])


def s3_dataset(work: str, images: int) -> tuple[object, str, dict[str, str]]:
    """Draw ``images`` JPEGs (shorter side 256 after prepare) into a moto S3 server."""
    import boto3
    from moto.server import ThreadedMotoServer

    from job.demo import SOURCE_SHAPES, draw_dataset

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    classes = dict(list(SOURCE_SHAPES.items())[:10])
    draw_dataset(os.path.join(work, "img"), classes, images // len(classes), size=288)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    s3_env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    # moto's servers in one process share their buckets: each dataset gets its own prefix
    # (prepare refuses a destination that holds one already).
    root = f"s3://bench/{os.path.basename(work)}"
    subprocess.run(
        [
            FINETUNE,
            "prepare",
            os.path.join(work, "img"),
            root,
            "--resize",
            "256",
            "--val-fraction",
            "0.05",
        ],
        check=True,
        env=env(**s3_env),
        stderr=subprocess.DEVNULL,
    )
    return server, root, s3_env


def p2() -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-p2-") as work:
        server, data, s3_env = s3_dataset(work, 1600)
        try:
            summary = train(["--data", data, "--epochs", "2", "--metrics-port", "19095"], **s3_env)
        finally:
            server.stop()  # type: ignore[attr-defined]
    job = steady_rate(summary)
    limit = compute_only(steps=12, threads=cores)
    print(
        f"P2 loop efficiency: full job {job:.1f} img/s (S3 data, metrics on, 1 process × "
        f"{cores} threads) / compute only {limit:.1f} img/s = {job / limit:.3f} (target >= 0.97)"
    )


def p3() -> None:
    one = steady_rate(
        train(
            [
                "--synthetic",
                "--synthetic-images",
                "384",
                "--epochs",
                "2",
                "--metrics-port",
                "0",
                "--threads",
                "1",
            ]
        )
    )
    two = steady_rate(
        train(
            [
                "--synthetic",
                "--synthetic-images",
                "768",
                "--epochs",
                "2",
                "--metrics-port",
                "0",
                "--threads",
                "1",
            ],
            launcher=["horovodrun", "-np", "2", "-H", "localhost:2"],
        )
    )
    print(
        f"P3 scaling: 2 processes × 1 thread {two:.1f} img/s / 1 process × 1 thread "
        f"{one:.1f} img/s = {two / one:.2f}× (target >= 1.8×)"
    )


def p5() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-p5-") as out:
        flags = "--synthetic --epochs 1 --synthetic-images 128 --log-interval 1 --metrics-port 0"
        cmd = train_command(out, flags.split(), ["horovodrun", "-np", "2", "-H", "localhost:2"])
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        first = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if first is None and " step 1/" in line:
                first = time.perf_counter() - started
        proc.wait()
    print(
        f"P5 launch to first training step, 2 workers (horovodrun, resnet18_v2): "
        f"{first:.1f} s (target <= 20 s)"
    )


def p6() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-p6-") as work:
        server, data, s3_env = s3_dataset(work, 400)
        try:
            summary = train(
                ["--data", data, "--epochs", "1", "--metrics-port", "19095"],
                launcher=["horovodrun", "-np", "2", "-H", "localhost:2"],
                **s3_env,
            )
        finally:
            server.stop()  # type: ignore[attr-defined]
    peaks = [b / 2**30 for b in summary["peak_rss_bytes_per_rank"]]
    print(
        "P6 peak RSS per worker (resnet18_v2, batch 32, 224², S3 data, 2 workers): "
        + ", ".join(f"rank {i} {p:.2f} GiB" for i, p in enumerate(peaks))
        + " (target <= 2.5 GiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("p2", "p3", "p5", "p6", "all"))
    which = parser.parse_args().which
    for name, bench in (("p2", p2), ("p3", p3), ("p5", p5), ("p6", p6)):
        if which in (name, "all"):
            bench()


if __name__ == "__main__":
    main()
