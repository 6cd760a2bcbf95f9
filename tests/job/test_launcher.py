"""Launcher-side readiness (job.launcher): the wait before mpirun, against real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from job import launcher
from job.errors import InputError

UNRESOLVABLE = "ft-worker-1.ft.ml.svc.invalid"  # .invalid never resolves (RFC 6761)


class FakeSshd:
    """A TCP listener on 127.0.0.1 that greets like sshd (or not), started now or later."""

    def __init__(self, banner: bytes = b"SSH-2.0-OpenSSH_9.2p1\r\n") -> None:
        self.banner = banner
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> FakeSshd:
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                if self.banner:
                    conn.sendall(self.banner)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def sshd() -> Iterator[FakeSshd]:
    server = FakeSshd().start()
    yield server
    server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostfile_lines_of_every_mpi_flavour(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(
        "# written by the MPI Operator\n"
        "ft-worker-0.ft.ml.svc slots=4\n"
        "ft-worker-1.ft.ml.svc slots=4\n"
        "\n"
        "ft-worker-1.ft.ml.svc slots=4\n"  # listed twice: probed once
        "intel-worker-0.intel.ml.svc:2\n"
        "10.0.0.7  slots=1 max_slots=2\n"
    )
    assert launcher.read_hosts(hostfile) == [
        "ft-worker-0.ft.ml.svc",
        "ft-worker-1.ft.ml.svc",
        "intel-worker-0.intel.ml.svc",
        "10.0.0.7",
    ]


def test_missing_or_empty_hostfile_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"cannot read the MPI hostfile .*/nothing.*/etc/mpi"):
        launcher.read_hosts(tmp_path / "nothing")
    (tmp_path / "empty").write_text("# no hosts\n\n")
    with pytest.raises(InputError, match=r"lists no hosts"):
        launcher.read_hosts(tmp_path / "empty")


def test_a_greeting_sshd_is_ready(sshd):
    assert launcher.probe("127.0.0.1", sshd.port, 5) is None
    assert launcher.probe("localhost", sshd.port, 5) is None


def test_probe_says_what_is_missing():
    assert launcher.probe(UNRESOLVABLE, 2222, 2) == "does not resolve"
    assert launcher.probe("127.0.0.1", _free_port(), 2).startswith("refuses port")
    silent = FakeSshd(banner=b"").start()  # accepts and closes: a port, not an sshd
    try:
        assert launcher.probe("127.0.0.1", silent.port, 2) == (
            f"sends no SSH banner on port {silent.port}"
        )
    finally:
        silent.close()


def test_ready_hosts_need_no_wait(sshd):
    seconds = launcher.wait_for_hosts(["127.0.0.1", "localhost"], sshd.port, timeout=30)
    assert seconds >= 0


def test_a_late_sshd_is_waited_for():
    late = FakeSshd()
    timer = threading.Timer(1.5, late.start)
    timer.start()
    try:
        seconds = launcher.wait_for_hosts(["127.0.0.1"], late.port, timeout=120, interval=0.2)
    finally:
        timer.join()
        late.close()
    assert seconds > 0  # it was refused first, then waited for


def test_timeout_names_every_host_not_ready(sshd):
    with pytest.raises(launcher.HostsNotReadyError) as err:
        launcher.wait_for_hosts(["127.0.0.1", UNRESOLVABLE], sshd.port, timeout=1, interval=0.2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("1 of 2 MPI hosts not ready after 1 s:")
    assert f"{UNRESOLVABLE} does not resolve" in message
    assert "127.0.0.1" not in message
    assert err.value.exit_code == 1


def test_a_ready_host_is_not_probed_again():
    calls: list[str] = []
    answers = iter([None, "does not resolve", None])

    def check(host: str, port: int, seconds: float) -> str | None:
        calls.append(host)
        return next(answers)

    now = [0.0]
    launcher.wait_for_hosts(
        ["a", "b"], 2222, timeout=60, check=check, clock=lambda: now[0], sleep=lambda s: None
    )
    assert calls == ["a", "b", "b"]


def test_many_missing_hosts_stay_one_line():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    hosts = [f"ft-worker-{i}.ft.ml.svc" for i in range(8)]
    with pytest.raises(launcher.HostsNotReadyError) as err:
        launcher.wait_for_hosts(
            hosts, 2222, 10, check=lambda *a: "does not resolve", clock=lambda: now[0], sleep=sleep
        )
    assert str(err.value).count("does not resolve") == 5
    assert "and 3 more" in str(err.value)


def _run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job.launcher", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_command_waits_then_returns_zero(sshd, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    proc = _run_main("--hostfile", str(hostfile), "--port", str(sshd.port), "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert "all 2 MPI hosts answer" in proc.stderr


def test_command_at_timeout_prints_one_line_and_fails(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{UNRESOLVABLE} slots=1\n")
    proc = _run_main("--hostfile", str(hostfile), "--timeout", "1", "--interval", "0.2")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        f"finetune-job launcher: error: 1 of 1 MPI hosts not ready after 1 s: {UNRESOLVABLE} "
        "does not resolve (are the worker pods Running and Ready? their sshd starts with the pod)"
    ]
    assert "Traceback" not in proc.stderr


def test_command_with_a_missing_hostfile_exits_2(tmp_path):
    proc = _run_main("--hostfile", str(tmp_path / "none"), "--timeout", "5")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot read the MPI hostfile" in proc.stderr


def test_timeout_zero_skips_the_wait(tmp_path):
    proc = _run_main("--hostfile", str(tmp_path / "none"), "--timeout", "0")
    assert proc.returncode == 0 and proc.stderr == ""
