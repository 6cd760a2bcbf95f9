"""One log format for every line the job writes on stderr.

- ``text``: ``2026-12-03T07:50:00.123Z INFO message``.
- ``json``: one object per line, ``{"time": "2026-12-03T07:50:00.123Z", "level": "INFO",
  "logger": "job.training.loop", "message": "...", ...extra fields}`` (python-json-logger).

Both carry the same RFC 3339 UTC timestamp (milliseconds, ``Z``). ``configure`` installs the
formatter on the root logger, so library lines that go through ``logging`` (MXNet's and
Horovod's Python side, botocore) and Python warnings (``logging.captureWarnings``) come out in
the same format. Progress lines are rendered by the same formatters (``render``), so a bar-less
run's stderr is one format from the first line to the last.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message")
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC with milliseconds: 2026-12-03T07:50:00.123Z."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:  # rounding up carries into the next second
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return rfc3339(record.created)


class JsonFormatter(_JsonFormatter):
    def __init__(self) -> None:
        super().__init__(JSON_FIELDS, rename_fields=JSON_RENAMES, json_ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return rfc3339(record.created)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {FORMATS}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: str = "text", stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    """Route every ``logging`` line and Python warning to ``stream`` (stderr) in ``fmt``.

    Called once by the CLI before a command runs, and again by ``train`` once the config
    (and so ``log_format``) is known; the second call replaces the first handler.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_finetune_job", False)]:
        root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler(stream) if stream else _StderrHandler()
    handler.setFormatter(formatter(fmt))
    handler.addFilter(_strip_warning_newline)
    handler._finetune_job = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Off, then on: installs logging's hook again should something have replaced
    # warnings.showwarning since an earlier call (on alone would then do nothing).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not its credential chatter
    logging.getLogger("smart_open").setLevel(logging.WARNING)  # not a line per upload part


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not to the stream it was
    when the handler was made: a command run in-process (a test, a notebook) after another
    one swapped stderr for its own would otherwise write to a closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always sys.stderr


def _strip_warning_newline(record: logging.LogRecord) -> bool:
    # logging.captureWarnings logs warnings.formatwarning(): "file:line: Category: text\n
    #   source line\n". Keep one warning on one line, in text as in JSON.
    if record.name == "py.warnings" and isinstance(record.msg, str) and not record.args:
        record.msg = " ".join(part.strip() for part in record.msg.splitlines() if part.strip())
    return True


def active_format() -> str:
    """The format of the handler ``configure`` installed (``text`` before any)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_finetune_job", False):
            return "json" if isinstance(handler.formatter, JsonFormatter) else "text"
    return "text"


def render(
    fmt: str,
    message: str,
    fields: dict[str, Any] | None = None,
    *,
    name: str = "job.training.progress",
) -> str:
    """One line as ``configure``'s handler would write it; ``fields`` become JSON keys (text
    shows only the message)."""
    record = logging.makeLogRecord(
        {"name": name, "levelno": logging.INFO, "levelname": "INFO", "msg": message}
    )
    record.__dict__.update(fields or {})
    return formatter(fmt).format(record)


def duration(seconds: float | None) -> str:
    """A short human duration for ETAs: 45s, 12m05s, 3h07m; ``--`` when not known yet."""
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
