"""Real Prometheus tools for tests: find (or apt-install) the Debian binaries, pick free
loopback ports, start a server and stop it, query its HTTP API.

Shared by tests/job (live workers) and tests/chart (alert rules); importable from both
because pyproject's pytest ``pythonpath`` holds tests/chart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest

# The Debian package that brings each binary.
PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-pushgateway": "prometheus-pushgateway",
}
APT_PACKAGES = tuple(dict.fromkeys(PACKAGES.values()))
_apt_tried: list[str] = []  # the one apt-get attempt of this session, and its outcome


def binary(name: str) -> str:
    """Path of ``name`` (prometheus, promtool, prometheus-pushgateway); apt-installs the
    Debian packages when missing and skips only when that is impossible here."""
    found = shutil.which(name)
    if found:
        return found
    if not _apt_tried:
        _apt_tried.append(_apt_install())
    found = shutil.which(name)
    if not found:
        pytest.skip(
            f"{name} is missing (Debian package {PACKAGES[name]}; `make test` installs it) and "
            f"apt-get could not install it: {_apt_tried[0]}"
        )
    return found


def _apt_install() -> str:
    """apt-get install the packages (after an update when the first try fails); the
    outcome in words, for a skip reason."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        return "not root and no sudo"
    install = [*sudo, "apt-get", "install", "-y", "-qq", *APT_PACKAGES]
    update = [*sudo, "apt-get", "update", "-qq"]
    outcome = ""
    for commands in ([install], [update, install]):
        outcome = _run_all(commands)
        if not outcome:
            return "installed"
    return outcome


def _run_all(commands: list[list[str]]) -> str:
    """Run commands in order; "" when all succeed, else what went wrong."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in commands:
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)}: {e}"
        if proc.returncode != 0:
            return f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return ""


def free_port(consecutive: int = 1) -> int:
    """A loopback port P such that P .. P+consecutive-1 are all free right now."""
    for _ in range(50):
        with closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive > 65535:
            continue
        if all(_free(port + i) for i in range(1, consecutive)):
            return port
    raise RuntimeError(f"no {consecutive} consecutive free ports on 127.0.0.1")


def _free(port: int) -> bool:
    with closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Call ``probe`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, ValueError, KeyError) as e:
            result, last = None, e
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@contextmanager
def server(args: list[str], port: int, log_path: str) -> Iterator[str]:
    """Run a Prometheus-family server on 127.0.0.1:port until the block ends; yields its
    base URL once ``/-/ready`` answers."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                with open(log_path) as f:
                    raise AssertionError(f"{args[0]} exited {proc.returncode}: {f.read()[-500:]}")
            get(base + "/-/ready", timeout=1)  # 200 when ready; urllib raises on 503
            return True

        wait_for(f"{os.path.basename(args[0])} on {base}", ready, timeout=20)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query against Prometheus's HTTP API; the result vector."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )
