"""The local cluster's processes: start one with its log and pid file, wait on it, stop it.

Each process runs in a session of its own, so it outlives the command that started it
(`make cluster` returns while the cluster runs) and is stopped only through its pid file.
A controller is started under a restart loop, as its Deployment would restart it on a
cluster: the MPI Operator, for one, exits when it loses its leader lease while the API
server is away.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 20


class ClusterError(RuntimeError):
    """The local cluster cannot start; the message names the component and says why."""


@dataclass(frozen=True)
class Proc:
    """One started component: its name, pid file and log file, under the state folder."""

    name: str
    state: Path

    @property
    def pid_file(self) -> Path:
        return self.state / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """The pid file's process runs and is still the program it names (not a reused pid)."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):  # exited, not yet collected
            return False
        if not cmdline:  # still exiting: its memory is gone, its sockets may not be
            return True
        return self.program() in os.fsdecode(cmdline).split("\0")

    def program(self) -> str:
        try:
            return (self.state / "pids" / f"{self.name}.program").read_text()
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# Runs "$0" "$@" again a second after it exits, for ever: a Deployment's restartPolicy.
RESTART_LOOP = 'while :; do "$0" "$@"; echo "exited with $?; restarting in 1 s"; sleep 1; done'


def start(
    state: Path,
    name: str,
    argv: Sequence[str | Path],
    env: dict[str, str] | None = None,
    restart: bool = False,
) -> Proc:
    """Start ``argv`` in its own session, its output in logs/<name>.log, its pid in pids/;
    with ``restart``, under a loop that starts it again whenever it exits."""
    proc = Proc(name, state)
    proc.log_file.parent.mkdir(parents=True, exist_ok=True)
    proc.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(proc.log_file, "ab") as log:
        child = subprocess.Popen(
            (["/bin/sh", "-c", RESTART_LOOP] if restart else []) + [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    (state / "pids" / f"{name}.program").write_text(str(argv[0]))
    proc.pid_file.write_text(str(child.pid))
    return proc


def stop(proc: Proc, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the pid file goes either way."""
    pid = proc.pid()
    if pid is not None and proc.alive():
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.alive():
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        _reap(pid)
    proc.pid_file.unlink(missing_ok=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the process and whatever it started
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own child's exit status, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(proc: Proc, what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` until it holds; fail with the log's tail if the process dies or time
    runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if _holds(check):
            return
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited before {what}; {_log_tail(proc)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{proc.name}: no {what} within {timeout:.0f} s; {_log_tail(proc)}")
        time.sleep(0.2)


def _log_tail(proc: Proc) -> str:
    return f"its log ({proc.log_file}) ends:\n{proc.tail()}"


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (OSError, urllib.error.URLError, ValueError):
        return False


def http_ok(
    url: str, ca: Path | None = None, token: str | None = None, verify: bool = True
) -> Callable[[], bool]:
    """A check that ``url`` answers 200 (TLS checked against ``ca`` unless ``verify`` is off)."""
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def check() -> bool:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=2, context=context) as resp:
            return bool(resp.status == 200)

    return check
