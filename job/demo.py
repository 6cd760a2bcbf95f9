"""``make demo``: fine-tuning vs training from scratch, end to end on this machine.

1. Draw a procedural image dataset (one class per shape: polygons, stars, crosses, rings,
   ...; random colours, sizes, positions and rotations on a cluttered background) as JPEG
   files in class folders, 10 source classes and 6 target classes.
2. Start an S3 server on loopback and ``finetune-job prepare`` both datasets into it.
3. Pretrain a source model on the source classes (2 Horovod workers under ``horovodrun``).
4. Fine-tune it on the few target images, and train the same network from scratch on them.
5. Print the table of target accuracy: fine-tuned vs from scratch, and write
   ``comparison.html``: both runs' learning curves on one set of axes (each run also wrote
   its own ``report.html``).

``python -m job.demo --help`` lists the knobs; the defaults run in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np

Shape = Callable[[np.random.Generator], np.ndarray]  # unit-size polygon points


def _regular(n: int) -> Shape:
    return lambda rng: np.stack(
        [
            np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
            np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False)),
        ],
        1,
    )


def _star(n: int, inner: float = 0.45) -> Shape:
    def pts(rng: np.random.Generator) -> np.ndarray:
        angles = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        radius = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)

    return pts


def _poly(points: list[tuple[float, float]]) -> Shape:
    arr = np.array(points, float)
    return lambda rng: arr


def _ellipse(ratio: float) -> Shape:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    return lambda rng: np.stack([np.cos(t), ratio * np.sin(t)], 1)


CROSS = [
    (-0.3, -1),
    (0.3, -1),
    (0.3, -0.3),
    (1, -0.3),
    (1, 0.3),
    (0.3, 0.3),
    (0.3, 1),
    (-0.3, 1),
    (-0.3, 0.3),
    (-1, 0.3),
    (-1, -0.3),
    (-0.3, -0.3),
]
X_SHAPE = [
    (
        x * math.cos(math.pi / 4) - y * math.sin(math.pi / 4),
        x * math.sin(math.pi / 4) + y * math.cos(math.pi / 4),
    )
    for x, y in CROSS
]
T_SHAPE = [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)]
L_SHAPE = [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]
ARROW = [(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)]
CRESCENT = [(math.cos(t), math.sin(t)) for t in np.linspace(-2.2, 2.2, 20)] + [
    (0.45 + 0.7 * math.cos(t), 0.7 * math.sin(t)) for t in np.linspace(2.0, -2.0, 20)
]

SOURCE_SHAPES: dict[str, Shape] = {
    "triangle": _regular(3),
    "square": _regular(4),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "circle": _regular(40),
    "star5": _star(5),
    "cross": _poly(CROSS),
    "ellipse": _ellipse(0.5),
    "arrow": _poly(ARROW),
    "diamond": _poly([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]),
}
TARGET_SHAPES: dict[str, Shape] = {
    "octagon": _regular(8),
    "star6": _star(6, 0.6),
    "x": _poly(X_SHAPE),
    "t": _poly(T_SHAPE),
    "l": _poly(L_SHAPE),
    "crescent": _poly(CRESCENT),
}


def draw(
    shape: Shape, size: int, rng: np.random.Generator, colour: tuple[int, int, int] | None = None
) -> np.ndarray:
    """One BGR image of ``shape`` (in a random colour unless given) on a cluttered background."""
    base = rng.integers(0, 120, 3)
    img = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):  # clutter lines
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        line = tuple(int(c) for c in rng.integers(0, 160, 3))
        cv2.line(img, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), line, 1)
    radius = rng.uniform(0.22, 0.4) * size
    centre = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (shape(rng) @ rot.T) * radius + centre
    fill = colour or tuple(int(c) for c in rng.integers(130, 256, 3))
    cv2.fillPoly(img, [np.round(pts).astype(np.int32)], fill, lineType=cv2.LINE_AA)
    return img


def draw_dataset(
    root: str,
    shapes: dict[str, Shape],
    per_class: int,
    size: int = 80,
    seed: int = 0,
    colours: dict[str, tuple[int, int, int]] | None = None,
) -> str:
    """Write ``per_class`` JPEGs of each shape into ``root/<shape>/``; returns ``root``.
    ``colours`` fixes a class's colour (an easier task, for quick tests)."""
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        colour = (colours or {}).get(name)
        for i in range(per_class):
            cv2.imwrite(
                os.path.join(folder, f"{i:04d}.jpg"),
                draw(shape, size, rng, colour),
                [cv2.IMWRITE_JPEG_QUALITY, 92],
            )
    return root


def _run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo-output", help="images, dataset and runs")
    parser.add_argument("--workers", type=int, default=2, help="Horovod workers")
    parser.add_argument("--source-images", type=int, default=200, help="images per source class")
    parser.add_argument("--target-images", type=int, default=24, help="images per target class")
    parser.add_argument("--source-epochs", type=int, default=10)
    parser.add_argument("--target-epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--local", action="store_true", help="keep data on disk, not in S3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    exe = [os.path.join(os.path.dirname(sys.executable), "finetune-job")]
    launch = ["horovodrun", "-np", str(args.workers), "-H", f"localhost:{args.workers}"]
    started = time.time()

    print(
        f"1. drawing {len(SOURCE_SHAPES)} source and {len(TARGET_SHAPES)} target shape classes",
        flush=True,
    )
    draw_dataset(os.path.join(work, "images/source"), SOURCE_SHAPES, args.source_images, seed=1)
    draw_dataset(os.path.join(work, "images/target"), TARGET_SHAPES, args.target_images, seed=2)

    server = None
    root = os.path.join(work, "store")
    if not args.local:
        server, endpoint = _start_s3()
        s3_env = dict(
            AWS_ACCESS_KEY_ID="demo",
            AWS_SECRET_ACCESS_KEY="demo",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        env.update(s3_env)
        os.environ.update(s3_env)  # this process reads the summaries back
        root = "s3://finetune-demo"
        print(f"2. S3 server on {endpoint}; data and outputs go to {root}", flush=True)
    try:
        resize = str(round(args.image_size * 1.15))
        for name in ("source", "target"):
            _run(
                [
                    *exe,
                    "prepare",
                    os.path.join(work, "images", name),
                    f"{root}/{name}",
                    "--resize",
                    resize,
                    "--val-fraction",
                    "0.25" if name == "target" else "0.1",
                ],
                env,
            )
        common = [
            "--image-size",
            str(args.image_size),
            "--batch-size",
            "16",
            "--metrics-port",
            "0",
            "--log-interval",
            "10",
            "--threads",
            "1",
        ]
        print("3. pretraining the source model", flush=True)
        scratch = ["--pretrained", "none", "--head-lr-mult", "1", "--lr", "0.05"]
        _run(
            [
                *launch,
                *exe,
                "train",
                "--data",
                f"{root}/source",
                "--output",
                f"{root}/runs/source",
                "--epochs",
                str(args.source_epochs),
                *scratch,
                *common,
            ],
            env,
        )
        results = {}
        source_model = ["--pretrained", f"{root}/runs/source/model.params", "--lr", "0.01"]
        for label, how in (("fine-tuned", source_model), ("from scratch", scratch)):
            print(f"4. target classes, {label}", flush=True)
            out = f"{root}/runs/target-{label.replace(' ', '-')}"
            _run(
                [
                    *launch,
                    *exe,
                    "train",
                    "--data",
                    f"{root}/target",
                    "--output",
                    out,
                    *how,
                    "--epochs",
                    str(args.target_epochs),
                    "--tta",
                    *common,
                ],
                env,
            )
            results[label] = _read_summary(out)
    finally:
        if server is not None:
            server.stop()
    _print_table(results, time.time() - started)
    _write_comparison(results, os.path.join(work, "comparison.html"))
    return 0


def _write_comparison(results: dict[str, dict], path: str) -> None:
    from job.outputs import report

    title = f"Target classes ({', '.join(TARGET_SHAPES)}): fine-tuned vs from scratch"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(report.comparison_html(results, title))
    print(f"comparison report: {path}; each run's own report.html is in its output")


def _start_s3():  # type: ignore[no-untyped-def]
    """An S3 endpoint on loopback (moto's server) with the demo bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="demo",
        aws_secret_access_key="demo",
        region_name="us-east-1",
    ).create_bucket(Bucket="finetune-demo")
    return server, endpoint


def _read_summary(out: str) -> dict:
    from job import layout
    from job.storage import Storage

    return layout.read_summary(Storage(), out)


def _print_table(results: dict[str, dict], seconds: float) -> None:
    print(f"\nTarget classes ({', '.join(TARGET_SHAPES)}), validation top-1:")
    print(f"  {'model':<14}{'center crop':>12}{'5-crop TTA':>12}{'best':>8}{'img/s':>9}")
    for label, s in results.items():
        print(
            f"  {label:<14}{s['val_top1']:>12.3f}{s.get('val_top1_tta') or 0:>12.3f}"
            f"{s['best_val_top1']:>8.3f}{s['train_images_per_second']:>9.1f}"
        )
    print(f"demo finished in {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
