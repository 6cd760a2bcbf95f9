"""The step watchdog under a real `mpirun -np 2`: a stalled rank ends the whole job with one line
naming the phase and the rank, the last checkpoint stays intact, and a rerun resumes from it.

Every wait is bounded generously; nothing here asserts on elapsed time except an upper bound
far above step_timeout that only a hang reaches."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 20  # step_timeout of these runs, seconds
BOUND = TIMEOUT + 150  # a run that stalls must be gone by then, however loaded the machine
EPOCHS = 3
LINE = "finetune-job: error: stalled: no step completed on rank"


def job_flags(epochs=EPOCHS):
    return (
        f"--pretrained none --head-lr-mult 1 --image-size 32 --batch-size 8 --epochs {epochs} "
        f"--lr 0.002 --metrics-port 0 --log-interval 1 --step-timeout {TIMEOUT}"
    ).split()


@pytest.fixture(scope="module")
def flags():
    return job_flags()


def rank_pids(mpirun: subprocess.Popen) -> dict[int, int]:
    """The training processes mpirun started, by the rank it gave them."""
    ranks = {}
    children = subprocess.run(["pgrep", "-P", str(mpirun.pid)], capture_output=True, text=True)
    for pid in map(int, children.stdout.split()):
        with contextlib.suppress(OSError):
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            for var in env:
                if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                    ranks[int(var.split(b"=")[1])] = pid
    return ranks


class Launch:
    """A job under mpirun with its output in a file; stopped ranks are released at the end."""

    def __init__(self, cmd, env, log_path) -> None:
        self.log_path, self.stopped = log_path, []
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def log(self) -> str:
        return open(self.log_path).read()

    def wait_for(self, text: str = "", ranks: int = 0, limit: float = 240) -> dict[int, int]:
        deadline = time.monotonic() + limit
        while True:
            pids = rank_pids(self.proc)
            if text in self.log() and len(pids) >= ranks:
                return pids
            assert self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < deadline, f"never saw {text!r}: " + self.log()[-3000:]
            time.sleep(0.05)

    def stop(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)  # a wedged GPU, a hung read, a partition: no progress
        self.stopped.append(pid)

    def end(self) -> tuple[int, str, float]:
        try:
            code = self.proc.wait(timeout=BOUND)
        finally:
            self.release()
        return code, self.log(), time.monotonic() - self.started

    def release(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


def stall_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(LINE)]


def latest(out: str) -> tuple[str, dict]:
    pointer = json.load(open(os.path.join(out, "checkpoints", "latest")))
    folder = os.path.join(out, "checkpoints", pointer["checkpoint"])
    return folder, json.load(open(os.path.join(folder, "state.json")))["progress"]


def finishes(cmd, env) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_rank_stopped_mid_epoch_ends_the_job_and_a_rerun_resumes(
    train_on_two, launch_env, tiny_dataset, flags, tmp_path
):
    out = str(tmp_path / "out")
    cmd = train_on_two("mpirun", "--data", tiny_dataset, "--output", out, *flags)
    job = Launch(cmd, launch_env, tmp_path / "log")
    try:
        pids = job.wait_for(f"epoch 2/{EPOCHS} step 2/", ranks=2)
        folder, progress = latest(out)  # the end of epoch 1, written before epoch 2 began
        job.stop(pids[1])
    finally:
        code, log, seconds = job.end()
    assert code != 0
    lines = stall_lines(log)
    assert lines, log[-3000:]
    assert any(
        "on rank 0 for 20 s (step_timeout), stuck in allreduce, waiting for rank 1" in line
        for line in lines
    ), lines
    assert f"last checkpoint: {folder}" in lines[0]
    assert seconds < BOUND
    assert "Traceback" not in log
    assert latest(out) == (folder, progress)  # intact: nothing half-written replaced it

    resumed = finishes(cmd, launch_env)
    assert f"resumed from {folder}: epoch 2, step {progress['step']}" in resumed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))


def test_a_rank_stopped_before_the_first_step_ends_the_job(
    train_on_two, launch_env, tiny_dataset, flags, tmp_path
):
    out = str(tmp_path / "out")
    cmd = train_on_two("mpirun", "--data", tiny_dataset, "--output", out, *flags)
    job = Launch(cmd, launch_env, tmp_path / "log")
    try:
        pids = job.wait_for(ranks=2)  # as soon as the processes exist
        job.stop(pids[1])
    finally:
        code, log, seconds = job.end()
    assert code != 0
    lines = stall_lines(log)
    assert any(
        "on rank 0 for 20 s (step_timeout), stuck in startup (waiting for every worker to join)"
        " before the first step, waiting for rank 1" in line
        for line in lines
    ), log[-3000:]
    assert seconds < BOUND and "Traceback" not in log
    assert not os.path.exists(os.path.join(out, "checkpoints", "latest"))
    finishes(cmd, launch_env)  # nothing was left behind that stops a rerun


def test_a_worker_that_never_joins_fails_the_launch_with_one_line(
    train_on_two, launch_env, tiny_dataset, flags, tmp_path
):
    """Rank 1's process starts but never reaches the training (a dead worker at start)."""
    out = str(tmp_path / "out")
    script = 'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exec sleep 100000; fi; exec "$@"'
    never = ["sh", "-c", script, "sh"]
    job = Launch(
        train_on_two("mpirun", "--data", tiny_dataset, "--output", out, *flags, prefix=never),
        launch_env,
        tmp_path / "log",
    )
    code, log, seconds = job.end()
    assert code != 0
    lines = stall_lines(log)
    assert len(lines) == 1, log[-3000:]
    assert "stuck in startup (waiting for every worker to join)" in lines[0]
    assert "waiting for rank 1" in lines[0]
    assert seconds < BOUND


def test_a_stall_during_evaluation_ends_the_job_and_a_rerun_resumes(
    train_on_two, launch_env, tiny_dataset, flags, tmp_path
):
    """The validation shard's index becomes a pipe nobody writes to (a hung network
    filesystem): every rank blocks reading it in epoch 2's evaluation. (The .rec keeps its
    size, which is checked against the manifest before the index is read.)"""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    shutil.copytree(tiny_dataset, data)
    finishes(
        train_on_two("mpirun", "--data", data, "--output", out, *job_flags(epochs=1)), launch_env
    )
    folder, progress = latest(out)
    assert progress["epoch"] == 1

    manifest = json.load(open(os.path.join(data, "manifest.json")))
    shard = os.path.join(data, manifest["splits"]["val"]["shards"][0]["idx"])
    os.rename(shard, shard + ".real")
    os.mkfifo(shard)
    cmd = train_on_two("mpirun", "--data", data, "--output", out, *flags)
    job = Launch(cmd, launch_env, tmp_path / "log")
    code, log, seconds = job.end()
    assert code != 0
    lines = stall_lines(log)
    assert lines and all(" stuck in evaluation" in line for line in lines), log[-3000:]
    assert seconds < BOUND and "Traceback" not in log
    assert latest(out)[0] == folder

    os.remove(shard)
    os.rename(shard + ".real", shard)
    resumed = finishes(cmd, launch_env)
    assert f"resumed from {folder}: epoch 2, step {progress['step']}" in resumed
