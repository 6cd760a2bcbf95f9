"""`wait` against a real API server that goes away and comes back, and a real etcd whose
history is compacted under it (the watch's resourceVersion then answers 410 Gone).

Each wait runs in a thread while the run's launcher is held Running; the API server is
restarted (and etcd compacted) in the middle; then the launcher is let go. The wait must
see the run succeed, report each phase once, and end within its own bound.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_tools import (
    HOLD,
    TRAINING,
    Play,
    eventually,
    install_release,
    submit_run,
    write_values,
)

from deploy import constants as c
from deploy.client import MPIJobClient
from deploy.localcluster import cluster as localcluster
from deploy.localcluster import processes

WAIT_BOUND = 180.0


class Waiter(threading.Thread):
    """client.wait(name) in a thread, with every phase it reported."""

    def __init__(self, client: MPIJobClient, name: str) -> None:
        super().__init__(daemon=True)
        self.client, self.name = client, name
        self.phases: list[str] = []
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.client.wait(
                self.name, timeout=WAIT_BOUND, on_change=lambda s: self.phases.append(s.phase)
            )
        except Exception as e:  # the test reads it
            self.result = e


@pytest.fixture
def held_run(
    helm: Any, namespace: str, kubeconfig: str, tmp_path: Path
) -> tuple[MPIJobClient, str, Play]:
    """A submitted run whose launcher kwok holds Running."""
    values = {
        "training": {**TRAINING, "output": str(tmp_path / "out")},
        "workers": {"replicas": 1, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
        "podAnnotations": {HOLD: "true"},
    }
    install_release(helm, namespace, write_values(tmp_path / "values.yaml", values))
    client, run = submit_run(helm, namespace, kubeconfig, values)
    return client, run.name, Play(client.api_client, namespace, tmp_path)


def _started(client: MPIJobClient, name: str) -> tuple[Waiter, str]:
    """A waiter that has seen the run Running, and the launcher pod's name."""
    play = Play(client.api_client, client.namespace, Path("/tmp"))
    launcher = play.launcher(name)
    waiter = Waiter(client, name)
    waiter.start()
    eventually("the waiter to see Running", lambda: c.RUNNING in waiter.phases)
    return waiter, launcher


def _finished(waiter: Waiter) -> Any:
    waiter.join(WAIT_BOUND + 30)
    assert not waiter.is_alive(), "the wait outlived its own bound"
    assert not isinstance(waiter.result, Exception), repr(waiter.result)
    assert waiter.result.succeeded
    assert waiter.phases[-1] == c.SUCCEEDED
    assert all(waiter.phases.count(p) == 1 for p in waiter.phases), waiter.phases
    return waiter.result


def test_a_wait_survives_an_api_server_restart(
    held_run: tuple[MPIJobClient, str, Play], local_cluster: localcluster.Cluster
) -> None:
    client, name, play = held_run
    waiter, launcher = _started(client, name)
    localcluster.restart_apiserver(local_cluster)
    play.release(launcher)
    _finished(waiter)


def test_a_wait_survives_a_compacted_history_410_gone(
    held_run: tuple[MPIJobClient, str, Play], local_cluster: localcluster.Cluster, api: Any
) -> None:
    client, name, play = held_run
    waiter, launcher = _started(client, name)
    seen_version = client.get(name)["metadata"]["resourceVersion"]
    processes.stop(local_cluster.proc("kube-apiserver"))
    _compact(local_cluster.etcd)
    localcluster.start_apiserver(local_cluster, _bins())
    # The version the waiter last saw is gone: a watch from it is answered 410 Gone.
    assert _watch_status(api, client.namespace, seen_version) == 410
    play.release(launcher)
    _finished(waiter)


def _bins() -> dict[str, Path]:
    from deploy.localcluster import build

    return build.binaries()


def _compact(etcd: str) -> None:
    """Compact etcd's whole history up to its current revision (etcd's JSON gateway)."""

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            etcd + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
    post("/v3/kv/compaction", {"revision": revision, "physical": True})


def _watch_status(api: Any, namespace: str, version: str) -> int:
    """What a watch of the namespace's MPIJobs from ``version`` answers: 200 or its error."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    custom: Any = k8s.CustomObjectsApi(api)
    try:
        resp = custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, watch=True,
            resource_version=version, timeout_seconds=2, _preload_content=False,
        )  # fmt: skip
    except ApiException as e:
        return int(e.status)
    for line in resp:
        event = yaml.safe_load(line)
        if event.get("type") == "ERROR":
            return int(event["object"]["code"])
    return 200


def test_a_server_away_longer_than_the_allowance_ends_the_wait_in_one_line(
    held_run: tuple[MPIJobClient, str, Play],
    local_cluster: localcluster.Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deploy import watches
    from deploy.errors import ApiError

    monkeypatch.setattr(watches, "RECONNECT_SECONDS", 3.0)
    client, name, _ = held_run
    waiter, _ = _started(client, name)
    processes.stop(local_cluster.proc("kube-apiserver"))
    try:
        waiter.join(60)
        assert not waiter.is_alive(), "the wait kept trying past its reconnect allowance"
    finally:
        localcluster.start_apiserver(local_cluster, _bins())
    assert isinstance(waiter.result, ApiError)
    assert f"cannot reach the API server at {local_cluster.server}" in str(waiter.result)
