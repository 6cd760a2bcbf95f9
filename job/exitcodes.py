"""The exit codes of every ``finetune-job`` command, training and Kubernetes side alike.

This table is the only one: the errors in ``job.errors`` and ``deploy.errors`` carry these
codes, and the README's "Exit codes" section lists exactly these rows (a test compares them).
A pipeline can branch on them.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    TIMED_OUT = 3
    GATE_REFUSED = 4
    INTERRUPTED = 130
    PREEMPTED = 143

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS = {
    ExitCode.OK: "done: trained, prepared, evaluated; submitted (and with `--wait`: succeeded "
    "and promoted); `status`: the job exists and has not failed",
    ExitCode.FAILED: "failed: training diverged, a data or storage error, a shard that does not "
    "match its manifest, a stalled step (`step_timeout`), another rank failed, the MPIJob "
    "failed, an API error",
    ExitCode.BAD_INPUT: "bad input or usage, nothing started: unknown key, wrong type or value, "
    "missing dataset, a pretrained file that does not fit, a bad manifest or values file, "
    "credentials in a URL, an output that cannot be written, a checkpoint of another run "
    "(fingerprint), `prepare` into a non-empty destination, a schedule whose last run has not "
    "finished, unknown job (404), name taken (409), permission denied (403), no kubeconfig, "
    "a missing extra (`pip install 'finetune-job[train]'` or `[deploy]`)",
    ExitCode.TIMED_OUT: "timed out: `--timeout` passed first (the MPIJob keeps running)",
    ExitCode.GATE_REFUSED: "the run succeeded but failed the gate (`--min-accuracy`, "
    "`--not-worse`, no usable summary.json); `latest` is unchanged",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
    ExitCode.PREEMPTED: "stopped by SIGTERM after checkpointing the current step; run the same "
    "command to continue",
}
