"""A write that fails mid-run (a full disk, a refused S3 PUT) is an input, not a crash: one
line naming the path and the cause, the exit code of a failed run, ``latest`` still naming a
complete checkpoint, and the same command, given room, resumes from it."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from s3_proxy import S3Proxy

from job.exitcodes import ExitCode
from job.storage import S3Settings, Storage
from job.training.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

EPOCHS = 4
ERROR = "finetune-job: error: "


def train(data, out, *extra):
    return [
        "finetune-job",
        "train",
        "--data",
        data,
        "--output",
        out,
        *f"--pretrained none --image-size 32 --batch-size 8 --epochs {EPOCHS}".split(),
        *"--metrics-port 0 --no-onnx".split(),
        *extra,
    ]


def run_until_latest_then(cmd, env, latest_exists, break_storage):
    """Start ``cmd``; once its first checkpoint is in, ``break_storage()`` while the run is
    stopped (so it cannot finish first); wait for the end."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not latest_exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    try:
        break_storage()
    finally:
        proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def assert_one_line(code, stderr, *words):
    assert code == ExitCode.FAILED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith(ERROR)]
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def tmpfs(tmp_path):
    """A 512 MB filesystem of its own, to fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder):
    """Write zeros into ``folder`` until its filesystem has no byte left."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as fh:
        for block in (bytes(1 << 20), bytes(512)):
            try:
                while fh.write(block):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC


def test_a_full_disk_is_one_line_and_the_run_resumes_on_a_bigger_disk(
    tiny_dataset, tmpfs, launch_env, tmp_path
):
    out = tmpfs / "out"
    latest = out / "checkpoints" / "latest"
    code, stderr = run_until_latest_then(
        train(tiny_dataset, str(out)), launch_env, latest.exists, lambda: fill(tmpfs)
    )
    line = assert_one_line(code, stderr, str(out), "No space left on device")
    pointer = json.loads(latest.read_text())
    assert pointer["step"] < EPOCHS * 12, line  # tiny_dataset: 12 steps an epoch

    bigger = tmp_path / "bigger"
    shutil.copytree(out, bigger)
    resumed = subprocess.run(
        train(tiny_dataset, str(bigger)), env=launch_env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {bigger}/checkpoints/{pointer['checkpoint']}" in resumed.stderr
    history = json.loads((bigger / "summary.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))


def test_a_refused_s3_write_is_one_line_and_leaves_latest_where_it_was(
    tiny_dataset, s3_server, s3_bucket, s3_env, launch_env
):
    with S3Proxy(s3_server) as proxy:
        env = {**launch_env, **s3_env, "AWS_ENDPOINT_URL": proxy.url}
        storage = Storage(S3Settings(endpoint_url=proxy.url))
        out = f"{s3_bucket}/out"
        refuse = re.compile(r"/out/checkpoints/step-")

        def forbid() -> None:
            proxy.refuse = refuse

        code, stderr = run_until_latest_then(
            train(tiny_dataset, out, "--checkpoint-interval", "0.002"),
            env,
            lambda: storage.exists(f"{out}/checkpoints/latest"),
            forbid,
        )
        before = json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))
        assert_one_line(code, stderr, f"{out}/checkpoints/step-", "AccessDenied")
        assert proxy.refused >= 1
        # latest names a checkpoint that checks out whole; the refused one left nothing.
        checkpointer = Checkpointer(storage, out, keep=3)
        with tempfile.TemporaryDirectory() as tmp:
            checkpointer._verified_copy(checkpointer.latest(), tmp)
        steps = {int(name[5:13]) for name in checkpointer._names()}
        assert max(steps) == before["step"]

        proxy.refuse = None
        resumed = subprocess.run(
            train(tiny_dataset, out), env=env, capture_output=True, text=True, timeout=300
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/{before['checkpoint']}" in resumed.stderr
