"""Pre-emption under a real `mpirun -np 2`: SIGTERM checkpoints the exact step, SIGKILL loses
at most the current epoch, and a restart of the same command finishes the job."""

import json
import os
import re
import signal
import subprocess
import time

import mxnet as mx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

EPOCHS, STEPS = 4, 6  # tiny_dataset: 96 training images, 2 workers × batch 8


@pytest.fixture(scope="module")
def command(tiny_dataset, train_on_two):
    """The job under `mpirun -np 2`, writing to ``out``; log lines at every step."""
    flags = (
        f"--pretrained none --head-lr-mult 1 --image-size 32 --batch-size 8 --epochs {EPOCHS} "
        "--lr 0.002 --metrics-port 0 --log-interval 1 --brightness 0 --contrast 0 "
        "--saturation 0 --hue 0"
    ).split()
    return lambda out: train_on_two("mpirun", "--data", tiny_dataset, "--output", out, *flags)


def run(cmd, env):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(cmd, env, log_path, when, action):
    """Start ``cmd``; once its log shows ``when``, call ``action(mpirun)``; wait for the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while when not in open(log_path).read():
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached " + when
        time.sleep(0.05)
    action(proc)
    proc.wait(timeout=120)
    return proc.returncode, open(log_path).read()


def sigterm_every_rank(mpirun):
    ranks = subprocess.run(["pgrep", "-P", str(mpirun.pid)], capture_output=True, text=True)
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGTERM)


def latest_progress(out):
    pointer = json.load(open(os.path.join(out, "checkpoints", "latest")))
    folder = os.path.join(out, "checkpoints", pointer["checkpoint"])
    return folder, json.load(open(os.path.join(folder, "state.json")))["progress"]


def weights(out):
    return {k: v.asnumpy() for k, v in mx.nd.load(os.path.join(out, "model.params")).items()}


def assert_same_training(a, b):
    """Equal to float tolerance, BatchNorm statistics included: a checkpoint stores them
    averaged over ranks, and their update is affine, so the mean at an epoch's end is the
    same whether the ranks resumed from the averages or kept their own."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(command, launch_env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    run(command(out), launch_env)
    return out


def test_sigterm_checkpoints_the_exact_step_and_a_restart_resumes_there(
    command, launch_env, uninterrupted, tmp_path
):
    out = str(tmp_path / "out")
    cmd = command(out)
    # Kubernetes sends SIGTERM to every pod; the workers' entrypoint passes it to the ranks.
    # (mpirun itself, signalled, passes SIGTERM on only odls_base_sigkill_timeout seconds
    # later and SIGKILLs as long after that: 1 s and 2 s by default.)
    code, log = interrupt(
        cmd, launch_env, tmp_path / "log", f"epoch 2/{EPOCHS} step 2/", sigterm_every_rank
    )
    assert code != 0
    folder, progress = latest_progress(out)
    epoch, batch, step = progress["epoch"], progress["batch"], progress["step"]
    assert f"stopped by SIGTERM at epoch {epoch + 1}, step {step}" in log
    assert 1 <= batch < STEPS and step == epoch * STEPS + batch  # mid-epoch, exact step
    assert [h["epoch"] for h in progress["history"]] == list(range(1, epoch + 1))

    resumed = run(cmd, launch_env)
    assert f"resumed from {folder}: epoch {epoch + 1}, step {step}" in resumed.stderr
    after = resumed.stderr.split("resumed from")[1]
    assert after.split(f"epoch {epoch + 1}/{EPOCHS} step ")[1].startswith(f"{batch + 1}/")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert_same_training(weights(uninterrupted), weights(out))


def test_sigkill_of_one_worker_fails_the_run_and_a_restart_finishes_it(
    command, launch_env, uninterrupted, tmp_path
):
    out = str(tmp_path / "out")
    cmd = command(out)

    def kill_one_rank(proc):
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        os.kill(int(ranks.stdout.split()[-1]), signal.SIGKILL)

    code, _ = interrupt(
        cmd, launch_env, tmp_path / "log", f"epoch 2/{EPOCHS} step 3/", kill_one_rank
    )
    assert code != 0
    folder, progress = latest_progress(out)
    assert progress["batch"] == 0 and 1 <= progress["epoch"] < EPOCHS  # the last whole epoch

    resumed = run(cmd, launch_env)
    epoch = progress["epoch"]
    assert f"resumed from {folder}: epoch {epoch + 1}, step {epoch * STEPS}" in resumed.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert_same_training(weights(uninterrupted), weights(out))


def test_one_process_exits_143_with_one_line_after_checkpointing(launch_env, tmp_path):
    out = tmp_path / "out"
    cmd = [
        "finetune-job",
        "train",
        "--synthetic",
        "--synthetic-images",
        "160",
        "--epochs",
        "50",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--pretrained",
        "none",
        "--metrics-port",
        "0",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=launch_env, stderr=subprocess.PIPE, text=True)
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not pointer.exists():  # past the first epoch
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    errors = [line for line in stderr.splitlines() if line.startswith("finetune-job: error:")]
    assert len(errors) == 1 and "stopped by SIGTERM at epoch" in errors[0]
    assert "Traceback" not in stderr
    _, progress = latest_progress(str(out))
    assert progress["batch"] >= 1


def step_rates(log):
    """{(epoch, step): the lr as logged} from a run's progress lines."""
    found = re.findall(r"epoch (\d+)/\d+ step (\d+)/\d+ .* lr (\S+)", log)
    return {(int(e), int(s)): lr for e, s, lr in found}


def test_resumed_on_one_worker_keeps_the_schedule_and_trains_the_rest_of_the_epoch_once(
    command, launchers, launch_env, tmp_path
):
    """2 workers take 6 steps an epoch, 1 worker 12: after the restart on 1 worker, its lr at
    each fraction of training is an uninterrupted 1-worker run's lr there."""
    out, straight = str(tmp_path / "out"), str(tmp_path / "straight")
    two = command(out)
    one = two[len(launchers["mpirun"]) :]  # the same command as one process
    code, _ = interrupt(two, launch_env, tmp_path / "log", f"epoch 2/{EPOCHS} step 2/",
                        sigterm_every_rank)  # fmt: skip
    assert code != 0
    folder, progress = latest_progress(out)
    epoch, batch = progress["epoch"], progress["batch"]
    assert progress["workers"] == 2 and 1 <= batch < STEPS

    resumed = run(one, launch_env).stderr
    assert f"resumed from {folder}: epoch {epoch + 1}" in resumed
    assert "(trained by 2 workers, now 1)" in resumed
    uninterrupted = [straight if arg == out else arg for arg in one]
    reference = step_rates(run(uninterrupted, launch_env).stderr)
    after = step_rates(resumed.split("resumed from")[1])
    first = (epoch + 1, 2 * batch + 1)  # the 1-worker step where the 2 workers stopped
    assert min(after) == first  # the next image, none trained twice or skipped
    assert after[first] == reference[first]
    assert after == {k: v for k, v in reference.items() if k >= first}
    # The rest of the interrupted epoch: its remaining 12 - 2 * batch steps of 8 images, i.e.
    # the 2 workers' remaining (6 - batch) steps of 16, each image once (tests/job/test_data.py
    # checks which images).
    assert max(s for e, s in after if e == epoch + 1) == 2 * STEPS
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert summary["workers"] == 1
