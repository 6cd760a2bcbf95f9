"""P9: ``finetune-job predict`` over a folder of JPEGs, against its limit and a per-image loop.

    .venv/bin/python benchmarks/predict.py                 # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/predict.py --images 500    # a quicker look

A run of resnet18_v2 at 224² (1 epoch on synthetic data: the weights do not change the
speed) is exported with its ONNX model. Then, for each engine (MXNet, ONNX Runtime), in one
process, one after the other on the same 2000 JPEGs (320 px shorter side, as a camera's
thumbnails):
- **predict**: ``job.outputs.predict.predict`` as the command runs it: the engine loaded,
  the folder listed, JPEGs read and decoded in threads while the engine runs the batch
  before, JSONL written. Default batch size and threads.
- **the limit**: the same engine on the same images already decoded and cropped, in batches
  of the same size: what the model alone can do on this machine.
- **a per-image loop**, as a user would write it: PIL open, resize, center crop and
  normalise in numpy, then one engine run per image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from input_pipeline import image_folder, machine  # noqa: E402

BIN = os.path.dirname(sys.executable)
MODEL, SIZE, BATCH = "resnet18_v2", 224, 32
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def exported_run(out: str) -> None:
    subprocess.run(
        [os.path.join(BIN, "finetune-job"), "train", "--synthetic", "--synthetic-images", "64",
         "--epochs", "1", "--output", out, "--model", MODEL, "--pretrained", "none",
         "--image-size", str(SIZE), "--metrics-port", "0"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")},
    )  # fmt: skip


def pil_input(path: str) -> np.ndarray:
    """What a user's loop does for one image: PIL decode, resize, center crop, normalise."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = SIZE / 0.875 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
        img = img.crop((left, top, left + SIZE, top + SIZE))
    x = (np.asarray(img, np.float32) - MEAN) / STD
    return x.transpose(2, 0, 1)[None]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(name, run, folder, paths, decoded, storage) -> tuple[str, float, float, float]:
    """(engine, predict img/s, limit img/s, per-image loop img/s); the limit also at other
    batch sizes, on the first 320 images, to show what the default batch size gives."""
    from job.outputs import predict

    engine, _ = (predict.onnx_engine if name == "onnx" else predict.mxnet_engine)(run, storage)
    engine(decoded[:BATCH])  # warm-up: graph planning, memory pools
    n = len(paths)
    for size in (1, 8, 32):
        seconds = timed(lambda b=size: [engine(decoded[i : i + b]) for i in range(0, 320, b)])
        print(f"{name}: the limit at batch {size}: {320 / seconds:.1f} img/s", flush=True)
    limit = timed(lambda: [engine(decoded[i : i + BATCH]) for i in range(0, n, BATCH)])
    out = os.path.join(os.path.dirname(folder), f"predictions-{name}.jsonl")
    ours = timed(lambda: predict.predict(run, [folder], storage, output=out, engine=name))
    loop = timed(lambda: [engine(pil_input(path)) for path in paths])
    print(f"{name}: predict {n / ours:.1f}, limit {n / limit:.1f}, "
          f"per-image loop {n / loop:.1f} img/s", flush=True)  # fmt: skip
    return name, n / ours, n / limit, n / loop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workdir", default="")
    args = p.parse_args()

    from job.input import augment
    from job.storage import Storage

    print(machine(), flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-p9-")
    folder = image_folder(work, args.images)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    run = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run, "summary.json")):
        print("training and exporting the model ...", flush=True)
        exported_run(run)
    storage = Storage()
    decoded = np.empty((len(paths), 3, SIZE, SIZE), np.float32)
    for i, path in enumerate(paths):
        with open(path, "rb") as fh:
            augment.eval_sample(augment.decode(fh.read()), SIZE, decoded[i], None)

    rows = [measure(name, run, folder, paths, decoded, storage) for name in ("mxnet", "onnx")]
    print(f"\nP9 {time.strftime('%Y-%m-%d %H:%M')}, {machine()}")
    print(f"{MODEL}, {SIZE}², {len(paths)} JPEGs (shorter side 320), batch {BATCH}, 2 cores")
    print("| engine | `predict` img/s | limit: decoded batches | per-image PIL loop | "
          "predict ÷ limit | predict ÷ loop |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours_rate, limit_rate, loop_rate in rows:
        print(f"| {name} | {ours_rate:.1f} | {limit_rate:.1f} | {loop_rate:.1f} | "
              f"{ours_rate / limit_rate:.2f} | {ours_rate / loop_rate:.2f}× |")  # fmt: skip
    print("\ngoals: predict ÷ limit ≥ 0.85, predict ÷ per-image loop ≥ 3×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
