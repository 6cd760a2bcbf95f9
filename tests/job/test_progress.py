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

from job.training.progress import CountProgress, Eta, ProgressLog

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
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
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
    log = ProgressLog(enabled=True, fmt="json", stream=out, metrics_stream=io.StringIO())
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
    assert re.fullmatch(RFC3339, step["time"]) and step["level"] == "INFO"
    assert step["progress_ratio"] == pytest.approx(20 / 120, abs=1e-4)
    assert step["eta_seconds"] is None  # one report measures no pace yet
    assert epoch["val_top1"] == 0.5


def test_text_lines_carry_units_when_not_a_terminal():
    out = io.StringIO()
    log = ProgressLog(enabled=True, fmt="text", stream=out)
    assert not log.bar
    log.step(**STEP)
    (line,) = out.getvalue().splitlines()
    assert re.fullmatch(
        RFC3339 + r" INFO epoch 1/3 step 20/40 loss 1\.2346 train_top1 0\.412 412\.3 img/s "
        r"lr 0\.0213 data-wait 3% ETA --",
        line,
    ), line


def test_other_ranks_print_nothing_but_feed_the_progress_gauges():
    out, metrics_out, seen = io.StringIO(), io.StringIO(), []
    log = ProgressLog(
        enabled=False,
        fmt="text",
        stream=out,
        metrics_stream=metrics_out,
        on_progress=lambda ratio, eta: seen.append((ratio, eta)),
    )
    log.step(**STEP)
    log.epoch(RECORD, epochs=3)
    assert out.getvalue() == "" and metrics_out.getvalue() == ""
    assert seen == [(pytest.approx(20 / 120), None)]


def test_a_terminal_gets_a_bar_redrawn_in_place():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=True) as tty:
            log = ProgressLog(enabled=True, fmt="text", stream=tty, metrics_stream=io.StringIO())
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
    assert "ETA --" in first
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


@pytest.mark.slow
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


# Katib's default StdOut metrics filter (katib pkg/metricscollector/v1beta1/common).
KATIB_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_the_runs_remaining_steps_at_the_measured_pace():
    clock = FakeClock()
    eta = Eta(clock)
    assert eta.update(10, 100) == (0.1, None)  # the first report only starts the clock
    clock.now += 30  # 20 more steps in 30 s: 1.5 s per step
    ratio, seconds = eta.update(30, 100)
    assert ratio == pytest.approx(0.3) and seconds == pytest.approx(70 * 1.5)
    clock.now += 60  # slower now: 60 s for 20 steps -> 90 s for 40 steps overall
    assert eta.update(50, 100)[1] == pytest.approx(50 * 90 / 40)
    assert eta.update(100, 100) == (1.0, 0.0)


def test_lines_carry_the_eta_over_the_whole_run_not_the_epoch():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog(
        enabled=True, fmt="json", stream=out, metrics_stream=io.StringIO(), clock=clock
    )
    log.step(**STEP)  # epoch 1 of 3, step 20 of 40: 20 of 120 steps
    clock.now += 10  # 20 steps in 10 s
    log.step(**{**STEP, "batch": 40})
    log.epoch(RECORD, epochs=3)
    first, second, epoch = (json.loads(line) for line in out.getvalue().splitlines())
    assert second["eta_seconds"] == pytest.approx(80 * 0.5)  # 80 steps left at 0.5 s
    assert epoch["eta_seconds"] == pytest.approx(40.0)
    assert second["progress_ratio"] == pytest.approx(40 / 120, abs=1e-4)


def test_metrics_line_is_what_katib_and_sagemaker_regexes_read():
    metrics_out = io.StringIO()
    log = ProgressLog(enabled=True, fmt="text", stream=io.StringIO(), metrics_stream=metrics_out)
    log.step(**{**STEP, "lr": 1e-05})
    record = {**RECORD, "val_top5": 0.9, "images_per_second": 412.3, "train_seconds": 3.2}
    log.epoch(record, epochs=3)
    (line,) = metrics_out.getvalue().splitlines()
    stamp, rest = line.split(" ", 1)
    assert re.fullmatch(RFC3339, stamp)
    found = {m[0]: float(m[1]) for m in re.findall(KATIB_FILTER, rest)}
    assert found == {
        "epoch": 1,
        "train_loss": 1.1,
        "train_top1": 0.45,
        "val_top1": 0.5,
        "val_top5": 0.9,
        "lr": 1e-05,
        "images_per_second": 412.3,
    }
    # A SageMaker metric definition: a plain regex per metric, digits and dots only.
    assert re.search(r"val_top1=([0-9\.]+)", line)[1] == "0.5"
    assert re.search(r"lr=([0-9\.]+)", line)[1] == "0.00001"


def test_metrics_line_leaves_out_what_the_record_lacks():
    log = ProgressLog(enabled=True, fmt="text", stream=io.StringIO(), metrics_stream=io.StringIO())
    line = log.metrics_line({"epoch": 2, "train_loss": 0.5}, now=0)
    assert line == "1970-01-01T00:00:00.000Z epoch=2 train_loss=0.5"


def test_count_progress_logs_periodic_lines_off_a_terminal():
    clock, lines = FakeClock(), []
    progress = CountProgress(100, "images", io.StringIO(), lines.append, interval=30, clock=clock)
    for _ in range(10):
        clock.now += 1
        progress.advance()
    assert lines == []  # 10 s: under the interval
    clock.now += 20
    progress.advance()
    progress.finish()
    assert lines == ["11/100 images (11%) 0.4 images/s ETA 4m03s"]  # 89 left at 11 per 30 s


def test_count_progress_redraws_in_place_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=True) as tty:
            clock = FakeClock()
            progress = CountProgress(4, "images", tty, lambda text: None, clock=clock)
            for _ in range(4):
                clock.now += 1
                progress.advance()
            progress.finish()
        shown = read_pty(master, time.monotonic() + 5)
    finally:
        os.close(master)
    frames = [f.replace("\x1b[K", "") for f in shown.split("\r") if f.strip()]
    assert frames[0] == "1/4 images (25%) 1.0 images/s ETA 3s"
    assert frames[-1].strip() == "4/4 images (100%) 1.0 images/s ETA 0s"
