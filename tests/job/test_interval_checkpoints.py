"""A hard failure loses minutes, not epochs: every rank of a 2-rank run that streams its data
from S3 and checkpoints to S3 is SIGKILLed (no SIGTERM, no chance to checkpoint) at a random
step, and the same command, run again, finishes the job as if nothing had happened."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from datetime import datetime

import mxnet as mx
import numpy as np
import pytest

from job.storage import S3Settings, Storage

pytestmark = pytest.mark.slow

EPOCHS, STEPS = 2, 24  # tiny_dataset: 96 training images, 2 workers × batch 2
INTERVAL_MINUTES = 0.005  # 0.3 s: several checkpoints an epoch
STEP_LINE = re.compile(r"^(\S+Z) INFO epoch (\d+)/\d+ step (\d+)/\d+ ", re.M)
WRITTEN = re.compile(r"checkpoint (\S+) \(written in ([\d.]+) s\)")


def train_command(train_on_two, data, out):
    flags = (
        f"--pretrained none --head-lr-mult 1 --image-size 32 --batch-size 2 --epochs {EPOCHS} "
        f"--lr 0.002 --metrics-port 0 --log-interval 1 --brightness 0 --contrast 0 "
        f"--saturation 0 --hue 0 --checkpoint-interval {INTERVAL_MINUTES}"
    ).split()
    return train_on_two("mpirun", "--data", data, "--output", out, *flags)


def steps_of(log):
    """[(wall time, global step)] of a run's progress lines."""
    found = STEP_LINE.findall(log)
    return [
        (datetime.fromisoformat(t).timestamp(), (int(e) - 1) * STEPS + int(s)) for t, e, s in found
    ]


def weights(storage, out):
    with storage.local_copy(f"{out}/model.params") as path:
        return {k: v.asnumpy() for k, v in mx.nd.load(path).items()}


def kill_every_rank_at_a_random_step(cmd, env, tmp_path):
    """Run ``cmd`` until a random step after its first interval checkpoint is written, then
    SIGKILL every rank and mpirun: (the step, the time of the kill, the run's log)."""
    kill_at = random.Random().randint(STEPS // 2, EPOCHS * STEPS - STEPS // 2)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        mpirun = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        text = log_path.read_text()
        steps = steps_of(text)
        if WRITTEN.search(text) and steps and steps[-1][1] >= kill_at:
            break
        assert mpirun.poll() is None, f"the run ended before step {kill_at}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"step {kill_at} never came:\n{text[-3000:]}"
        time.sleep(0.02)
    ranks = subprocess.run(["pgrep", "-P", str(mpirun.pid)], capture_output=True, text=True)
    killed_at = time.time()
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    mpirun.kill()
    mpirun.wait(timeout=60)
    return kill_at, killed_at, log_path.read_text()


def latest_state(storage, out):
    pointer = json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))
    return json.loads(storage.read_bytes(f"{out}/checkpoints/{pointer['checkpoint']}/state.json"))


@pytest.fixture
def s3_run(tiny_dataset, s3_bucket, s3_upload, s3_env, launch_env, train_on_two, s3_server):
    data = f"{s3_bucket}/data"
    s3_upload(tiny_dataset, data)
    env = dict(launch_env, **s3_env)
    storage = Storage(S3Settings(endpoint_url=s3_server))
    return lambda out: train_command(train_on_two, data, out), env, storage, s3_bucket


def test_sigkill_of_every_rank_loses_at_most_an_interval_and_the_restart_ends_as_if_uninterrupted(
    s3_run, tmp_path
):
    """What a run loses to SIGKILL: from the ``latest`` checkpoint to the kill. The due flag
    of an interval travels with a step's allreduce and is read one step later (so that all
    ranks take it after the same step), and ``latest`` moves once the background write is
    checked; so the bound is the interval, the write of up to two checkpoints (one in flight
    defers the next) and three steps (due, read, and the one the kill cut short), each
    measured in this run.

    The final model equals an uninterrupted run's to float tolerance, BatchNorm statistics
    included: a checkpoint stores them averaged over ranks while each rank keeps its own,
    and their update is affine, so the run never depends on when checkpoints were taken
    (the uninterrupted run takes its own, at other steps)."""
    command, env, storage, bucket = s3_run
    straight = subprocess.run(
        command(f"{bucket}/straight"), env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = f"{bucket}/killed"
    kill_at, killed_at, first = kill_every_rank_at_a_random_step(command(out), env, tmp_path)
    state = latest_state(storage, out)
    resumed_step = state["progress"]["step"]
    assert 0 < resumed_step < EPOCHS * STEPS, f"killed at step {kill_at}"
    times = [t for t, _ in steps_of(first)]
    step_s = max(b - a for a, b in zip(times, times[1:], strict=False))
    write_s = max(float(s) for _, s in WRITTEN.findall(first))
    lost = killed_at - state["saved_at"]
    bound = INTERVAL_MINUTES * 60 + 2 * write_s + 3 * step_s
    assert lost <= bound, f"killed at step {kill_at}: lost {lost:.2f} s > {bound:.2f} s"

    again = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step {resumed_step}" in again.stderr.split("resumed from")[1].splitlines()[0]
    before = [s for _, s in steps_of(first) if s <= resumed_step]
    after = [s for _, s in steps_of(again.stderr)]
    assert before + after == list(range(1, EPOCHS * STEPS + 1)), f"killed at step {kill_at}"
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))

    expected, got = weights(storage, f"{bucket}/straight"), weights(storage, out)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_run_killed_mid_epoch_resumes_on_one_worker_and_trains_the_rest_of_the_epoch_once(
    s3_run, tmp_path, launchers
):
    """2 workers take 24 steps an epoch, 1 worker 48: resumed on 1 worker from an interval
    checkpoint after 2-worker step B of an epoch, the next step is 1-worker step 2B+1."""
    command, env, storage, bucket = s3_run
    out = f"{bucket}/killed"
    two = command(out)
    kill_at, _, _ = kill_every_rank_at_a_random_step(two, env, tmp_path)
    progress = latest_state(storage, out)["progress"]
    epoch, batch = progress["epoch"], progress["batch"]
    assert progress["workers"] == 2, f"killed at step {kill_at}"

    one = two[len(launchers["mpirun"]) :]
    resumed = subprocess.run(one, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(trained by 2 workers, now 1)" in resumed.stderr
    after = STEP_LINE.findall(resumed.stderr.split("resumed from")[1])
    steps = [(int(e), int(s)) for _, e, s in after]
    rest = [(epoch + 1, s) for s in range(2 * batch + 1, 2 * STEPS + 1)]
    later = [(e, s) for e in range(epoch + 2, EPOCHS + 1) for s in range(1, 2 * STEPS + 1)]
    assert steps == rest + later, f"killed at step {kill_at}: resumed at {epoch + 1}/{batch}"
