"""Rank 0's progress output: a bar on a real terminal (a pty), otherwise one line per log
interval, as text or as JSON lines; the real command on a pty draws the bar too."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import time

import pytest

from job.progress import ProgressLog

STEP = dict(
    epoch=1,
    epochs=3,
    batch=20,
    steps=40,
    loss=1.23456,
    acc=0.4125,
    lr=0.0213,
    images_per_second=412.34,
    data_share=0.031,
)
RECORD = {"epoch": 1, "train_loss": 1.1, "train_top1": 0.45, "val_top1": 0.5}


def read_pty(master: int, until: float, done=None) -> str:
    """What a terminal would show: bytes from the pty master until ``until`` (monotonic)
    or until ``done()``."""
    chunks = []
    while time.monotonic() < until:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif done is not None and done():
            break
    # The terminal turns each "\n" into "\r\n" (onlcr); undo that, keep the bar's "\r".
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_json_lines_parse_and_carry_every_field():
    out = io.StringIO()
    log = ProgressLog(enabled=True, fmt="json", stream=out)
    log.step(**STEP)
    log.epoch(RECORD, epochs=3)
    step, epoch = (json.loads(line) for line in out.getvalue().splitlines())
    assert step["event"] == "step" and epoch["event"] == "epoch"
    assert {k: step[k] for k in ("epoch", "epochs", "step", "steps")} == {
        "epoch": 1,
        "epochs": 3,
        "step": 20,
        "steps": 40,
    }
    assert step["loss"] == pytest.approx(1.23456)
    assert step["train_top1"] == pytest.approx(0.4125)
    assert step["images_per_second"] == pytest.approx(412.3)
    assert step["lr"] == pytest.approx(0.0213)
    assert step["data_wait_share"] == pytest.approx(0.031)
    assert step["time"] > 1.6e9
    assert epoch["val_top1"] == 0.5


def test_text_lines_carry_units_when_not_a_terminal():
    out = io.StringIO()
    log = ProgressLog(enabled=True, fmt="text", stream=out)
    assert not log.bar
    log.step(**STEP)
    (line,) = out.getvalue().splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d epoch 1/3 step 20/40 loss 1\.2346 train_top1 0\.412 412\.3 img/s "
        r"lr 0\.0213 data-wait 3%",
        line,
    ), line


def test_other_ranks_print_nothing():
    out = io.StringIO()
    log = ProgressLog(enabled=False, fmt="text", stream=out)
    log.step(**STEP)
    log.epoch(RECORD, epochs=3)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_redrawn_in_place():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=True) as tty:
            log = ProgressLog(enabled=True, fmt="text", stream=tty)
            assert log.bar
            log.step(**STEP)
            log.step(**{**STEP, "batch": 40})
            log.epoch(RECORD, epochs=3)
        shown = read_pty(master, time.monotonic() + 5)
    finally:
        os.close(master)
    first, second = shown.split("\r")[1:3]
    assert first.startswith("epoch 1/3 [" + "#" * 15 + "." * 15 + "] 20/40 loss 1.2346")
    assert "412.3 img/s" in first and "lr 0.0213" in first and "data-wait 3%" in first
    assert second.startswith("epoch 1/3 [" + "#" * 30 + "] 40/40")
    assert "epoch 1/3 done: train_loss 1.1" in shown.split("\r")[-1]


def test_json_stays_json_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=True) as tty:
            log = ProgressLog(enabled=True, fmt="json", stream=tty)
            assert not log.bar
            log.step(**STEP)
        shown = read_pty(master, time.monotonic() + 5)
    finally:
        os.close(master)
    assert json.loads(shown.strip())["event"] == "step"


def test_the_command_on_a_terminal_draws_a_bar(launch_env, tmp_path):
    """`finetune-job train` with stderr on a pty: bar updates, then the epoch lines."""
    master, slave = pty.openpty()
    cmd = [
        "finetune-job",
        "train",
        "--synthetic",
        "--synthetic-images",
        "96",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--pretrained",
        "none",
        "--log-interval",
        "4",
        "--metrics-port",
        "0",
        "--output",
        str(tmp_path / "out"),
    ]
    proc = subprocess.Popen(cmd, env=launch_env, stdout=slave, stderr=slave, stdin=slave)
    os.close(slave)
    try:
        shown = read_pty(master, time.monotonic() + 240, done=lambda: proc.poll() is not None)
        assert proc.wait(30) == 0, shown[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    bars = re.findall(r"\repoch (\d)/2 \[([#.]{30})\] (\d+)/12 loss", shown)
    assert [(e, n) for e, _, n in bars] == [
        ("1", "4"),
        ("1", "8"),
        ("1", "12"),
        ("2", "4"),
        ("2", "8"),
        ("2", "12"),
    ], shown[-2000:]
    assert bars[-1][1] == "#" * 30
    assert re.search(r"epoch 2/2 done: train_loss [\d.]+", shown)
