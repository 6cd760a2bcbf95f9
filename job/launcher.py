"""Launcher-side readiness: wait, bounded, until every MPI host answers before mpirun starts.

The MPI Operator creates the launcher once every worker pod is Ready when the MPIJob says
``launcherCreationPolicy: WaitForWorkersReady``. Kueue's suspend/resume and gang schedulers
skip that wait (kubeflow/mpi-operator#615, #608), a worker's DNS name exists only once its pod
is Ready, and mpirun started earlier dies with ``ssh: Could not resolve hostname`` and then
``ORTE was unable to reliably start one or more daemons``. So the image's entrypoint runs this
first on the launcher (``finetune-job-entrypoint launcher mpirun ...``)::

    python -m job.launcher --hostfile /etc/mpi/hostfile --port 2222 --timeout 600

It returns once every host in the hostfile resolves and its sshd sends its banner, and fails
with one line naming the hosts that never did when the timeout passes.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from job.errors import InputError, JobError

PROG = "finetune-job launcher"
PROBE_SECONDS = 5.0  # longest single resolve + connect + banner read
# Probe: (host, port, seconds) -> None when the host is ready, else why not (a few words).
Probe = Callable[[str, int, float], "str | None"]


class HostsNotReadyError(JobError):
    """Some MPI hosts never resolved or never answered on the ssh port in time."""


def read_hosts(path: Path) -> list[str]:
    """Host names of an MPI hostfile, in order, each once.

    Open MPI lines are ``host slots=N`` (the MPI Operator's, and Trainer's), Intel MPI and MPICH
    ones ``host:N``; blank lines and ``#`` comments are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(
            f"cannot read the MPI hostfile {path}: {e.strerror or e}; the MPI Operator mounts "
            "it at /etc/mpi/hostfile on the launcher"
        ) from e
    hosts: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        host = words[0].rsplit(":", 1)[0] if words[0].count(":") == 1 else words[0]
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise InputError(f"the MPI hostfile {path} lists no hosts")
    return hosts


def probe(host: str, port: int, seconds: float = PROBE_SECONDS) -> str | None:
    """None when `host` resolves and an sshd greets on `port`; else what is missing."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return "does not resolve"
    try:
        with socket.create_connection((host, port), timeout=seconds) as conn:
            # An sshd speaks first ("SSH-2.0-..."); a bare open port is not an sshd yet.
            banner = conn.recv(8)
    except TimeoutError:
        return f"does not answer on port {port}"
    except OSError as e:
        return f"refuses port {port} ({e.strerror or e})"
    if not banner.startswith(b"SSH-"):
        return f"sends no SSH banner on port {port}"
    return None


def wait_for_hosts(
    hosts: Sequence[str],
    port: int,
    timeout: float,
    interval: float = 1.0,
    check: Probe = probe,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Probe until every host is ready (a ready host is not probed again); seconds waited.

    Raises HostsNotReadyError naming each host still not ready once `timeout` passes.
    """
    start = clock()
    deadline = start + timeout
    pending = {host: "not probed yet" for host in hosts}
    while True:
        for host in list(pending):
            left = deadline - clock()
            reason = check(host, port, max(0.1, min(PROBE_SECONDS, left)))
            if reason is None:
                del pending[host]
            else:
                pending[host] = reason
        if not pending:
            return clock() - start
        if clock() >= deadline:
            raise HostsNotReadyError(_not_ready_message(pending, len(hosts), timeout))
        sleep(max(0.0, min(interval, deadline - clock())))


def _not_ready_message(pending: dict[str, str], total: int, timeout: float) -> str:
    shown = list(pending.items())[:5]
    more = f"; and {len(pending) - len(shown)} more" if len(pending) > len(shown) else ""
    hosts = "; ".join(f"{host} {reason}" for host, reason in shown)
    return (
        f"{len(pending)} of {total} MPI hosts not ready after {timeout:g} s: {hosts}{more} "
        "(are the worker pods Running and Ready? their sshd starts with the pod)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostfile", type=Path, default=Path("/etc/mpi/hostfile"))
    parser.add_argument("--port", type=int, default=2222, help="the workers' sshd port")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait in all (0: do not wait)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        return 0
    try:
        hosts = read_hosts(args.hostfile)
        print(
            f"{PROG}: waiting for {len(hosts)} MPI hosts of {args.hostfile} "
            f"(ssh port {args.port}, up to {args.timeout:g} s)",
            file=sys.stderr,
            flush=True,
        )
        seconds = wait_for_hosts(hosts, args.port, args.timeout, args.interval)
    except JobError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    print(f"{PROG}: all {len(hosts)} MPI hosts answer ({seconds:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
