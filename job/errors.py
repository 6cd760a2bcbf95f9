"""Named failures of the job; each message is one line naming the thing at fault."""

from __future__ import annotations


class JobError(Exception):
    """A failure the command reports in one line, exiting with ``exit_code``."""

    exit_code = 1


class InputError(JobError):
    """Bad input found at start: a missing dataset, a pretrained file that does not fit."""

    exit_code = 2


class DataError(JobError):
    """A shard or record could not be read and the run cannot go on without it."""


class DivergedError(JobError):
    """The loss became NaN or infinite."""


class PreemptedError(JobError):
    """SIGTERM arrived: the exact step was checkpointed; a restart resumes from it."""

    exit_code = 143  # 128 + SIGTERM, as a terminated process reports it
