"""The command line in a subprocess, for the tests of what a user sees (exit codes, one-line
errors, help)."""

from __future__ import annotations

import subprocess
import sys


def finetune_job(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`finetune-job ARGS` (the combined command line of both layers)."""
    return subprocess.run(
        [sys.executable, "-m", "deploy.entry", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
