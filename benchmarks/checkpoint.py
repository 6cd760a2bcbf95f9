"""P11: what interval checkpoints cost training, written in the background or not.

    .venv/bin/python benchmarks/checkpoint.py              # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/checkpoint.py --mbps 400 --every 2

resnet50_v1 from scratch, batch 32 per process, 224², synthetic images (so that only the
checkpoints differ), ``horovodrun -np 2`` with one compute thread each, 2 epochs. The output
is on S3: moto's server behind a proxy that gives uploads one link of ``--mbps`` MB/s
(tests/s3_proxy.py). Three runs, one after the other:
- **none**: ``--checkpoint-interval 0`` (the epoch-end checkpoints only, outside the timed
  training);
- **background**: a checkpoint every ``--every`` steps (the interval set from the step time of
  the first run), written on the background thread (the default);
- **synchronous**: the same interval with ``--no-async-checkpoints``: training waits for
  every upload, as it did before.
Reported: the last epoch's training images/s of each (summary.json), and each ÷ none.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from input_pipeline import machine, start_moto  # noqa: E402
from s3_proxy import S3Proxy  # noqa: E402

BIN = os.path.dirname(sys.executable)
MODEL, BATCH, SIZE, STEPS = "resnet50_v1", 32, 224, 8  # steps per epoch, 2 workers
KEYS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def train(out: str, endpoint: str, *flags: str) -> tuple[dict, str]:
    """One run under horovodrun -np 2: its summary and rank 0's log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update(KEYS, AWS_ENDPOINT_URL=endpoint, PATH=BIN + os.pathsep + env["PATH"])
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2",
           os.path.join(BIN, "finetune-job"), "train", "--synthetic", "--synthetic-images",
           str(STEPS * BATCH * 2), "--epochs", "2", "--output", out, "--model", MODEL,
           "--pretrained", "none", "--batch-size", str(BATCH), "--image-size", str(SIZE),
           "--threads", "1", "--metrics-port", "0", "--no-onnx", "--log-interval", "1000",
           *flags]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    from job.storage import S3Settings, Storage

    storage = Storage(S3Settings(endpoint_url=endpoint))
    return json.loads(storage.read_bytes(f"{out}/summary.json")), proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mbps", type=float, default=50.0, help="upload link, MB/s")
    p.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    args = p.parse_args()
    os.environ.update(KEYS)
    print(machine(), flush=True)
    moto, upstream = start_moto()
    try:
        with S3Proxy(upstream, upload_bytes_per_second=args.mbps * 1e6) as proxy:
            from job.storage import S3Settings, Storage

            Storage(S3Settings(endpoint_url=proxy.url)).client.create_bucket(Bucket="bench")
            print("none ...", flush=True)
            none, _ = train("s3://bench/none", proxy.url, "--checkpoint-interval", "0")
            rate = none["history"][-1]["images_per_second"]
            step_s = 2 * BATCH / rate
            minutes = args.every * step_s / 60
            runs = {"none": (none, "")}
            for name, extra in (("background", []), ("synchronous", ["--no-async-checkpoints"])):
                print(f"{name}: a checkpoint every {minutes * 60:.1f} s ...", flush=True)
                runs[name] = train(
                    f"s3://bench/{name}",
                    proxy.url,
                    "--checkpoint-interval",
                    f"{minutes:.4f}",
                    *extra,
                )
    finally:
        moto.terminate()
    print(f"\nP11 {time.strftime('%Y-%m-%d %H:%M')}, {machine()}")
    print(
        f"{MODEL} from scratch, batch {BATCH}/process, {SIZE}², synthetic data, horovodrun "
        f"-np 2 × 1 thread, {STEPS} steps an epoch; output on S3 behind a {args.mbps:g} MB/s "
        f"link; a checkpoint every {args.every} steps ({minutes * 60:.1f} s)"
    )
    print("| checkpoints | last epoch img/s | ÷ none | written in (s) |")
    print("|---|---:|---:|---|")
    for name, (summary, log) in runs.items():
        got = summary["history"][-1]["images_per_second"]
        writes = ", ".join(re.findall(r"\(written in ([\d.]+) s\)", log)) or "-"
        print(f"| {name} | {got:.2f} | {got / rate:.3f} | {writes} |")
    print("\ngoal: background ÷ none ≥ 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
