"""One log format: RFC 3339 UTC timestamps in text and JSON, library lines and warnings through
the same handler, and the CLI's error line as JSON when the logs are JSON."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import warnings

import pytest

from job import logs

RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_800_000_000.5, "2027-01-15T08:00:00.500Z"),
        (59.9996, "1970-01-01T00:01:00.000Z"),  # rounding carries into the next second
    ],
    ids=["epoch", "millis", "carry"],
)
def test_rfc3339_is_utc_with_milliseconds(seconds, text):
    assert logs.rfc3339(seconds) == text


def test_json_carries_library_lines_and_warnings_in_one_format(restore_logging):
    out = io.StringIO()
    logs.configure("json", out)
    logging.getLogger("mxnet.gluon").warning("a library line %d", 7)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown even if an earlier test in this process warned
        logs.configure("json", out)  # inside: logging's hook over catch_warnings' own
        warnings.warn("a python warning", UserWarning, stacklevel=1)
    logging.getLogger("job.training.loop").info("resumed", extra={"epoch": 3})
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["logger"] for o in objects] == ["mxnet.gluon", "py.warnings", "job.training.loop"]
    assert objects[0]["message"] == "a library line 7" and objects[0]["level"] == "WARNING"
    assert "a python warning" in objects[1]["message"]
    assert "\n" not in objects[1]["message"]
    assert objects[2]["epoch"] == 3
    assert all(re.fullmatch(RFC3339, o["time"]) for o in objects)
    assert logs.active_format() == "json"


def test_text_uses_the_same_timestamp(restore_logging):
    out = io.StringIO()
    logs.configure("text", out)
    logging.getLogger("x").info("hello")
    assert re.fullmatch(RFC3339 + r" INFO hello\n", out.getvalue())
    assert logs.active_format() == "text"


def test_configure_twice_keeps_one_handler(restore_logging):
    first, second = io.StringIO(), io.StringIO()
    logs.configure("text", first)
    logs.configure("json", second)
    logging.getLogger("x").info("once")
    assert first.getvalue() == "" and len(second.getvalue().splitlines()) == 1


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "--"), (4.4, "4s"), (725, "12m05s"), (11220, "3h07m")],
)
def test_durations(seconds, text):
    assert logs.duration(seconds) == text


def test_a_failing_train_with_json_logs_prints_only_json(launch_env, tmp_path):
    """A config the Config accepts but the run rejects (no dataset there) ends with one JSON
    error object, not a plain line, and stderr has nothing else but JSON."""
    proc = subprocess.run(
        ["finetune-job", "train", "--data", str(tmp_path / "none"), "--output", str(tmp_path)]
        + ["--log-format", "json", "--metrics-port", "0"],
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    objects = [json.loads(line) for line in proc.stderr.splitlines()]
    assert objects[-1]["level"] == "ERROR" and objects[-1]["event"] == "error"
    assert str(tmp_path / "none") in objects[-1]["message"]


def test_the_handler_follows_stderr_when_it_is_swapped(monkeypatch):
    """A second in-process command (a test, a notebook cell) swaps stderr: lines go to the
    new one, never to the closed stream of the first."""
    import io
    import logging
    import sys

    from job import logs

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure("text")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("finetune_job.test").warning("after the swap")
    assert "after the swap" in second.getvalue()
    assert "Logging error" not in second.getvalue()
