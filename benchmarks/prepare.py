"""P8: ``finetune-job prepare`` against MXNet's ``tools/im2rec.py``, side by side.

    .venv/bin/python benchmarks/prepare.py                 # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/prepare.py --images 300 --workers 1 2

1. Generates a folder of photo-like JPEGs (quality 90) of mixed sizes: a third 2000x1500,
   the rest between 480x360 and 800x600, in 10 class folders.
2. Converts it with each contender, resize (shorter side) 256, JPEG quality 95, with 1 and
   with 2 processes, one after the other:
   - ``im2rec.py`` as MXNet ships it (``mxnet/tools/im2rec.py``): ``--list --recursive`` to
     make the .lst, then ``--resize 256 --quality 95 --num-thread N`` into one local .rec;
   - ``finetune-job prepare SRC DEST --resize 256 --quality 95 --workers N`` into a local
     folder of shards, and into ``s3://`` on a moto S3 server (its own process);
3. Reports images/s (wall clock of the command, listing included) and the peak RSS of the
   command's whole process tree (sampled every 20 ms), for the dataset and for one half its
   size: RSS that does not grow with the dataset is bounded.
4. Measures the machine's own 1 -> 2 process scaling for the same kind of work (decode and
   re-encode in-memory JPEGs in a process pool), the ceiling for prepare's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from input_pipeline import machine, start_moto  # noqa: E402

BIN = os.path.dirname(sys.executable)
RESIZE, QUALITY = 256, 95


def make_images(folder: str, count: int, seed: int = 0) -> None:
    """Smooth noise textures with detail; a third of them 2000x1500, the rest smaller."""
    import cv2

    rng = np.random.default_rng(seed)
    for i in range(count):
        if i % 3 == 0:
            w, h = 2000, 1500
        else:
            w = int(rng.integers(480, 801))
            h = w * 3 // 4
        if rng.random() < 0.3:
            w, h = h, w  # portrait
        img = np.zeros((h, w, 3), np.float32)
        for cells, weight in ((4, 90), (24, 40)):
            noise = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
            img += weight * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        img += rng.uniform(60, 190, 3).astype(np.float32)
        folder_c = os.path.join(folder, f"c{i % 10}")
        os.makedirs(folder_c, exist_ok=True)
        cv2.imwrite(
            os.path.join(folder_c, f"{i:05d}.jpg"),
            np.clip(img, 0, 255).astype(np.uint8),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds of ``cmd`` and the peak RSS (bytes) of its whole process tree."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {err.decode()[-2000:]}")
    return seconds, peak


def im2rec(src: str, work: str, workers: int) -> tuple[float, int]:
    import mxnet

    tool = os.path.join(os.path.dirname(mxnet.__file__), "tools", "im2rec.py")
    prefix = os.path.join(work, "im2rec")
    # Both steps count: prepare lists the folder too.
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, tool, "--list", "--recursive", prefix, src],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    listing = time.perf_counter() - started
    cmd = [sys.executable, tool, "--resize", str(RESIZE), "--quality", str(QUALITY)]
    cmd += ["--num-thread", str(workers), prefix, src]
    seconds, peak = run_measured(cmd)
    for ext in (".rec", ".idx", ".lst"):
        os.remove(prefix + ext)
    return listing + seconds, peak


_FILES: list[bytes] = []


def _recode(i: int) -> int:
    import cv2

    img = cv2.imdecode(np.frombuffer(_FILES[i], np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    return len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1])


def ceiling(src: str, workers: list[int], count: int = 300) -> dict[int, float]:
    """The machine's own parallel scaling for this kind of work: decode and re-encode
    in-memory JPEGs in a pool of N processes (no files, no writer), images/s per N."""
    import multiprocessing

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)[:count]
    _FILES[:] = [open(f, "rb").read() for f in files]
    rates = {}
    for n in workers:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            pool.map(_recode, range(2 * n))  # warm
            started = time.perf_counter()
            pool.map(_recode, list(range(len(files))) * 2, chunksize=8)
            rates[n] = 2 * len(files) / (time.perf_counter() - started)
    return rates


def prepare(src: str, dest: str, workers: int, env: dict[str, str] | None = None):
    cmd = [os.path.join(BIN, "finetune-job"), "prepare", src, dest]
    cmd += ["--resize", str(RESIZE), "--quality", str(QUALITY), "--workers", str(workers)]
    return run_measured(cmd, env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2400, help="images in the full dataset")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workdir", default="", help="keep the generated images here")
    args = p.parse_args()
    print(machine(), flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-prepare-")
    sizes = {"full": args.images, "half": args.images // 2}
    folders = {}
    for name, count in sizes.items():
        folders[name] = os.path.join(work, f"images-{count}")
        if not os.path.isdir(folders[name]):
            print(f"generating {count} JPEGs ...", flush=True)
            make_images(folders[name], count)
    moto, endpoint = start_moto()
    s3_env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket="bench")  # fmt: skip
    rows = []
    try:
        for workers in args.workers:
            for name, count in sizes.items():
                print(f"{workers} worker(s), {count} images ...", flush=True)
                src = folders[name]
                s_ref, rss_ref = im2rec(src, work, workers)
                dest = os.path.join(work, f"ds-{workers}-{count}")
                s_ours, rss_ours = prepare(src, dest, workers)
                subprocess.run(["rm", "-rf", dest], check=True)
                s3_dest = f"s3://bench/ds-{workers}-{count}"
                s_s3, rss_s3 = prepare(src, s3_dest, workers, s3_env)
                rows.append((workers, count, s_ref, rss_ref, s_ours, rss_ours, s_s3, rss_s3))
    finally:
        moto.terminate()
    print()
    print(
        "| workers | images | im2rec img/s | prepare img/s | vs im2rec | prepare to S3 img/s "
        "| peak RSS im2rec / prepare / prepare S3 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for workers, count, s_ref, rss_ref, s_ours, rss_ours, s_s3, rss_s3 in rows:
        print(
            f"| {workers} | {count} | {count / s_ref:.1f} | {count / s_ours:.1f} "
            f"| {s_ref / s_ours:.2f}x | {count / s_s3:.1f} "
            f"| {rss_ref / 2**20:.0f} / {rss_ours / 2**20:.0f} / {rss_s3 / 2**20:.0f} MiB |"
        )
    full = {row[0]: row for row in rows if row[1] == sizes["full"]}
    if 1 in full and 2 in full:
        speedup = full[1][4] / full[2][4]
        print(f"\nprepare, 1 -> 2 workers ({sizes['full']} images): {speedup:.2f}x")
        rates = ceiling(folders["full"], [1, 2])
        print(
            f"the machine, in-memory decode + encode, 1 -> 2 processes: "
            f"{rates[1]:.0f} -> {rates[2]:.0f} img/s, {rates[2] / rates[1]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
