"""Named failures of the job; each message is one line naming the thing at fault.

Each carries its exit code from the one table in ``job.exitcodes``.
"""

from __future__ import annotations

from typing import Any

from job.exitcodes import ExitCode


class JobError(Exception):
    """A failure the command reports in one line, exiting with ``exit_code``."""

    exit_code: int = ExitCode.FAILED


class InputError(JobError):
    """Bad input found at start: a missing dataset, a pretrained file that does not fit."""

    exit_code = ExitCode.BAD_INPUT


class MissingExtraError(InputError):
    """A command needs a package of an extra that is not installed."""


class DataError(JobError):
    """A shard or record could not be read and the run cannot go on without it."""


class DivergedError(JobError):
    """The loss became NaN or infinite."""


class PreemptedError(JobError):
    """SIGTERM arrived: the exact step was checkpointed; a restart resumes from it."""

    exit_code = ExitCode.PREEMPTED  # 128 + SIGTERM, as a terminated process reports it


class GateError(JobError):
    """A run's summary did not pass the promotion gate; ``latest`` was not moved."""

    exit_code = ExitCode.GATE_REFUSED

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class StorageError(JobError):
    """A storage operation failed; the message names the URI."""


class StreamError(StorageError):
    """A streamed read broke off (dropped connection, read timeout, short body).

    The bytes read before it are good; the reader may resume with a ranged request.
    """
