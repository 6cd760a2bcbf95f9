"""Fixtures of the tests against the local cluster (real kube-apiserver, controllers, operators).

One cluster serves the whole session, with its real node: the one `make cluster NODE=real`
left running in .cluster/, or a new one started there and stopped at the end. Each test works
in a namespace of its own and deletes it. A failing test's report carries the tail of every
component's log.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from chart_tools import REPO_ROOT, find_or_install_helm, values_args
from cluster_tools import Helm

from deploy.client import MPIJobClient
from deploy.localcluster import cluster as localcluster
from deploy.localcluster import node

STATE = REPO_ROOT / ".cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[localcluster.Cluster]:
    before = localcluster.load(STATE)
    ours = before is None or not before.real_node or before.running() != list(before.processes)
    started = localcluster.up(STATE, real_node=True)
    yield started
    if ours:
        pids = [started.proc(name).pid() for name in started.processes]
        localcluster.down(STATE)
        left = [pid for pid in pids if pid and _running(pid)]
        assert not left, f"processes left running after down: {left}"
        assert node.leftovers(STATE) == []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and "local_cluster" in getattr(item, "fixturenames", ()):
        found = localcluster.load(STATE)
        for name in found.processes if found else ():
            report.sections.append((f"{name} log (tail)", found.proc(name).tail(12)))
    return report


@pytest.fixture(scope="session")
def kubeconfig(local_cluster: localcluster.Cluster) -> str:
    return str(local_cluster.kubeconfig)


@pytest.fixture(scope="session")
def api(kubeconfig: str) -> Any:
    from kubernetes import config as k8s_config

    return k8s_config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture
def namespace(api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client as k8s

    name = (
        f"t-{request.node.name[5:30].lower().strip('_-').replace('_', '-')}-{secrets.token_hex(3)}"
    )
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def client(kubeconfig: str, namespace: str) -> MPIJobClient:
    return MPIJobClient(kubeconfig=kubeconfig, namespace=namespace, request_timeout=10)


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return find_or_install_helm()


@pytest.fixture
def helm(helm_binary: Path, kubeconfig: str, tmp_path: Path) -> Helm:
    """Run helm against the cluster: helm("install", "r", "-n", ns, values={...}, files=[...])."""

    def run(
        *args: str, values: Mapping[str, Any] | None = None, files: tuple[Path, ...] = ()
    ) -> str:
        argv = [str(helm_binary), "--kubeconfig", kubeconfig, *args]
        if args and args[0] in ("install", "upgrade", "template"):
            argv += values_args(values, files, tmp_path)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
        return done.stdout

    return run


def _running(pid: int) -> bool:
    """The process exists and has not exited (an exited one its parent has not yet
    collected is a zombie: it runs nothing and holds no port)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
