"""P7: ``finetune-job train`` against the reference Horovod MXNet recipe and against the limit,
the compute-only loop, side by side.

    .venv/bin/python benchmarks/reference_loop.py          # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/reference_loop.py --images 600 --epochs 2 --image-size 128

The reference is our own write-up of the recipe of Horovod's MXNet ImageNet example
(``examples/mxnet/mxnet_imagenet_resnet50.py``, from its public description): a Gluon model-zoo
ResNet, ``mx.io.ImageRecordIter`` on a local .rec (random crop and mirror, colour jitter,
``preprocess_threads``, one part per rank), ``hvd.DistributedTrainer``, and the per-step
``loss.backward(); trainer.step()`` loop with a metric update each step. This file runs it
when started as ``reference_loop.py --worker ...`` under ``horovodrun -np 2``.

Both sides get the same JPEGs (``prepare``'s shards; the reference's .rec is those shards
concatenated), the same model (resnet18_v1 from scratch), batch, input size, epochs and
threads (1 compute thread and 1 decode thread per process), under ``horovodrun -np 2``. Ours
reads the shards from a moto S3 server (its own process), and also evaluates each epoch,
checkpoints, serves metrics and exports; the reference reads a local file and does none of
that. The limit is the reference's loop with the input taken away: the same model, trainer
and step on one in-memory batch, under the same ``horovodrun -np 2``, with one sync per epoch
(``--compute-only``). Reported: each side's images/s of its last epoch (training only, all
workers together), from its own timer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from input_pipeline import image_folder, machine, record_iter_args, start_moto  # noqa: E402

BIN = os.path.dirname(sys.executable)
MODEL = "resnet18_v1"


def worker(args: argparse.Namespace) -> None:
    """One rank of the reference recipe; rank 0 prints a JSON line per epoch."""
    import horovod.mxnet as hvd
    import mxnet as mx
    from mxnet import autograd, gluon

    hvd.init()
    ctx = mx.cpu()
    if args.compute_only:  # one batch, already in memory, as many steps as an epoch has
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        batch = mx.io.DataBatch([mx.nd.random.normal(shape=shape)], [mx.nd.zeros(args.batch_size)])
        data = ComputeOnly(batch, steps=args.images * 9 // 10 // (args.batch_size * hvd.size()))
    else:
        data = mx.io.ImageRecordIter(
            **record_iter_args(args.rec, args.image_size, args.batch_size, args.threads, True),
            num_parts=hvd.size(),
            part_index=hvd.rank(),
        )
    net = gluon.model_zoo.vision.get_model(MODEL, pretrained=False, classes=10)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx)
    net.hybridize()
    with autograd.train_mode():  # shapes known (and MKLDNN layouts settled) before the broadcast
        net(mx.nd.zeros((args.batch_size, 3, args.image_size, args.image_size), ctx=ctx))
    hvd.broadcast_parameters(net.collect_params(), root_rank=0)
    opt = mx.optimizer.create("sgd", learning_rate=0.01 * hvd.size(), momentum=0.9, wd=1e-4)
    trainer = hvd.DistributedTrainer(net.collect_params(), opt)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    metric = mx.metric.Accuracy()
    for epoch in range(args.epochs):
        data.reset()
        metric.reset()
        images, started = 0, time.perf_counter()
        for batch in data:
            x, y = batch.data[0].as_in_context(ctx), batch.label[0].as_in_context(ctx)
            with autograd.record():
                out = net(x)
                loss = loss_fn(out, y)
            loss.backward()
            trainer.step(args.batch_size)
            if not args.compute_only:
                metric.update([y], [out])
            images += args.batch_size
        mx.nd.waitall()
        seconds = time.perf_counter() - started
        rate = hvd.allreduce(mx.nd.array([images / seconds]), average=False, name=f"r{epoch}")
        total = float(rate.asscalar())  # every rank waits for it: none leaves the sum early
        if hvd.rank() == 0:
            name, acc = metric.get()
            line = {"epoch": epoch + 1, "images_per_second": total, name: acc}
            print(json.dumps(line), flush=True)


class ComputeOnly:
    """``steps`` times the same batch, as an iterator with ``reset``."""

    def __init__(self, batch: object, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def reset(self) -> None:
        pass

    def __iter__(self):
        return iter([self.batch] * self.steps)


def epoch_lines(out: str) -> list[dict]:
    """Rank 0's JSON epoch lines from horovodrun's output ("[1,0]<stdout>:{...}", which may
    run into the next line's prefix)."""
    decode = json.JSONDecoder().raw_decode
    return [decode(ln[ln.index("{") :])[0] for ln in out.splitlines() if "{" in ln]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_mpi_yield_when_idle="1",
        OMP_NUM_THREADS="1",
        MXNET_CPU_WORKER_NTHREADS="1",
        PYTHONUNBUFFERED="1",
    )
    e.update(extra)
    return e


def horovodrun(cmd: list[str], environ: dict[str, str]) -> str:
    full = [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2", *cmd]
    proc = subprocess.run(full, env=environ, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--threads", type=int, default=1, help="decode threads per process")
    p.add_argument("--workdir", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rec", default="", help=argparse.SUPPRESS)
    p.add_argument("--compute-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    from job.input.prepare import prepare
    from job.storage import S3Settings, Storage

    print(machine(), flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-p7-")
    images = image_folder(work, args.images)
    local = os.path.join(work, f"ds-{args.images}")
    if not os.path.exists(os.path.join(local, "manifest.json")):
        prepare(images, local, Storage(), resize=256, shard_size=250)
    rec = os.path.join(work, f"train-{args.images}.rec")  # RecordIO files concatenate
    with open(rec, "wb") as out:
        for name in sorted(os.listdir(os.path.join(local, "train"))):
            if name.endswith(".rec"):
                with open(os.path.join(local, "train", name), "rb") as fh:
                    shutil.copyfileobj(fh, out)
    moto, endpoint = start_moto()
    keys = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(keys)
    try:
        s3 = Storage(S3Settings(endpoint_url=endpoint))
        s3.client.create_bucket(Bucket="bench")
        for dirpath, _, files in os.walk(local):
            for name in sorted(files, key=lambda n: n == "manifest.json"):
                rel = os.path.relpath(os.path.join(dirpath, name), local)
                s3.upload(os.path.join(dirpath, name), f"s3://bench/ds/{rel}")
        common = ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
        common += ["--epochs", str(args.epochs)]
        print("reference recipe under horovodrun -np 2 ...", flush=True)
        out = horovodrun(
            [sys.executable, os.path.abspath(__file__), "--worker", "--rec", rec,
             "--threads", str(args.threads), *common],
            env(),
        )  # fmt: skip
        reference = epoch_lines(out)
        print("the limit: the compute-only loop under horovodrun -np 2 ...", flush=True)
        out = horovodrun(
            [sys.executable, os.path.abspath(__file__), "--worker", "--compute-only",
             "--images", str(args.images), *common],
            env(),
        )  # fmt: skip
        limit = epoch_lines(out)
        print("finetune-job train under horovodrun -np 2 ...", flush=True)
        output = os.path.join(work, "out")
        shutil.rmtree(output, ignore_errors=True)
        horovodrun(
            [os.path.join(BIN, "finetune-job"), "train", "--data", "s3://bench/ds",
             "--output", output, "--model", MODEL, "--pretrained", "none",
             "--data-workers", str(args.threads), "--threads", "1", "--metrics-port", "9311",
             "--log-interval", "1000", *common],
            env(AWS_ENDPOINT_URL=endpoint, **keys),
        )  # fmt: skip
        with open(os.path.join(output, "summary.json")) as fh:
            ours = json.load(fh)["history"]
    finally:
        moto.terminate()
    theirs_rate = reference[-1]["images_per_second"]
    ours_rate = ours[-1]["images_per_second"]
    limit_rate = limit[-1]["images_per_second"]
    print(f"\nP7 {time.strftime('%Y-%m-%d %H:%M')}, {machine()}")
    print(
        f"{MODEL} from scratch, batch {args.batch_size}/process, {args.image_size}², "
        f"{args.epochs} epochs of {args.images} images (ours: 90 % train, 10 % val), "
        "horovodrun -np 2, 1 compute + 1 decode thread per process"
    )
    print("| | last epoch img/s (2 workers) | per epoch |")
    print("|---|---:|---|")
    per = ", ".join(f"{r['images_per_second']:.1f}" for r in reference)
    print(f"| reference recipe (ImageRecordIter, local .rec) | {theirs_rate:.1f} | {per} |")
    per = ", ".join(f"{r['images_per_second']:.1f}" for r in ours)
    print(
        f"| finetune-job train (S3 shards, eval, checkpoints, metrics) | {ours_rate:.1f} | {per} |"
    )
    per = ", ".join(f"{r['images_per_second']:.1f}" for r in limit)
    print(f"| the limit: compute only (one in-memory batch) | {limit_rate:.1f} | {per} |")
    print(f"\nours ÷ reference: {ours_rate / theirs_rate:.2f}× (goal ≥ 1.05×)")
    print(f"ours ÷ compute only: {ours_rate / limit_rate:.3f} (goal ≥ 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
