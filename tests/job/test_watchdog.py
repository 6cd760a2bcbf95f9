"""The step watchdog's decision and its one line, with a fake clock and exit."""

from __future__ import annotations

import io
import threading

import pytest

from job.exitcodes import ExitCode
from job.training import distributed, watchdog
from job.training.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dog(rank=1, size=2, timeout=20.0):
    clock, stream, exits = Clock(), io.StringIO(), []
    w = Watchdog(timeout, rank, size, stream=stream, exit=exits.append, clock=clock)
    return w, clock, stream, exits


@pytest.mark.parametrize(
    ("phase", "steps", "expected"),
    [
        (watchdog.ALLREDUCE, 5, "stuck in allreduce, waiting for rank 0, which stopped responding"),
        (watchdog.DATA, 5, "stuck in data wait: rank 1 itself stalled"),
        (watchdog.COMPUTE, 5, "stuck in forward/backward: rank 1 itself stalled"),
        (watchdog.CHECKPOINT, 5, "stuck in checkpoint: rank 1 itself stalled"),
        (watchdog.EVALUATION, 5, "stuck in evaluation: rank 1 itself stalled"),
        (
            watchdog.EVALUATION_ALLREDUCE,
            5,
            "stuck in evaluation (the allreduce of its results), waiting for rank 0",
        ),
        (watchdog.STARTUP, 0, "before the first step, waiting for rank 0, which never joined"),
    ],
)
def test_the_line_names_the_phase_and_the_rank_that_stalled(phase, steps, expected):
    w, _, _, _ = dog()
    w.current, w.steps, w.checkpoint = phase, steps, "out/checkpoints/step-00000012"
    line = w.message()
    assert line.startswith("finetune-job: error: stalled: no step completed on rank 1 for 20 s")
    assert expected in line and line.endswith("last checkpoint: out/checkpoints/step-00000012")
    assert "\n" not in line


def test_a_phase_lasts_for_its_block_and_the_one_before_comes_back():
    w, _, _, _ = dog()
    with w.phase(watchdog.DATA):
        with w.phase(watchdog.ALLREDUCE):
            assert "stuck in allreduce" in w.message()
        assert "stuck in data wait" in w.message()
    assert w.current == watchdog.STARTUP


def test_more_than_two_ranks_cannot_name_the_one_that_stalled():
    w, _, _, _ = dog(rank=3, size=8)
    w.current = watchdog.ALLREDUCE
    assert "a rank which stopped responding (one that printed no such line)" in w.message()


def test_it_fires_once_no_step_completed_for_the_timeout_and_not_before():
    w, clock, stream, exits = dog(timeout=20)
    clock.now += 15
    w.beat()
    clock.now += 19.5
    assert w.seconds_since_beat() == pytest.approx(19.5)
    w._watch_once()
    assert exits == []
    clock.now += 1
    w._watch_once()
    assert exits == [ExitCode.FAILED]
    assert stream.getvalue().count("\n") == 1


def test_its_thread_fires_on_its_own():
    """(That it ends a process whose main thread is blocked in an allreduce is shown under
    mpirun in test_watchdog_mpi.py.)"""
    exited = threading.Event()
    w = Watchdog(0.2, 0, 1, stream=io.StringIO(), exit=lambda code: exited.set())
    w.start()
    assert exited.wait(30)
    w.stop()


def test_zero_turns_it_off():
    w = Watchdog(0, 0, 1, exit=lambda code: pytest.fail("fired"))
    assert w.start()._thread is None


def test_horovod_gets_its_stall_settings_from_step_timeout_and_user_values_win():
    env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "99"}
    distributed.stall_environment(20, env)
    assert env == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "10",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "20",
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "99",
    }
    off: dict[str, str] = {}
    distributed.stall_environment(0, off)
    assert off == {}
