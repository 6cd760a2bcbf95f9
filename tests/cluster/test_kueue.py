"""The chart's MPIJob under the real Kueue: created suspended, no pods until a ClusterQueue
admits it; with quota for one run, a second run waits for the first to finish, then runs.

Kueue's webhooks (registered at 127.0.0.1 by the local cluster) suspend the MPIJob at
admission; the real MPI Operator creates no pods for a suspended MPIJob, and resumes it once
Kueue admits its Workload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cluster_tools import HOLD, TRAINING, Helm, Play, eventually, install

from deploy import constants as c

KUEUE = ("kueue.x-k8s.io", "v1beta2")
# One run: a launcher of 0.5 CPU and 2 workers of 1 CPU; the quota fits one, not two.
RUN_RESOURCES = {
    "launcher": {"resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}},
    "workers": {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
}
QUOTA = {"cpu": "3", "memory": "8Gi"}


@pytest.fixture
def kueue(api: Any, namespace: str) -> Any:
    """Create Kueue objects (cluster-scoped ones are deleted after the test)."""
    from kubernetes import client as k8s

    custom: Any = k8s.CustomObjectsApi(api)
    made: list[tuple[str, str]] = []

    def create(plural: str, body: dict[str, Any], namespaced: bool = False) -> None:
        body = {"apiVersion": "/".join(KUEUE), **body}
        if namespaced:
            custom.create_namespaced_custom_object(*KUEUE, namespace, plural, body)
        else:
            custom.create_cluster_custom_object(*KUEUE, plural, body)
            made.append((plural, body["metadata"]["name"]))

    yield create
    for plural, name in reversed(made):
        custom.delete_cluster_custom_object(*KUEUE, plural, name)


def _mpijob(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client as k8s

    custom: Any = k8s.CustomObjectsApi(api)
    return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name))


def _workload(api: Any, namespace: str, job: str) -> dict[str, Any] | None:
    from kubernetes import client as k8s

    custom: Any = k8s.CustomObjectsApi(api)
    for item in custom.list_namespaced_custom_object(*KUEUE, namespace, "workloads")["items"]:
        if any(ref["name"] == job for ref in item["metadata"].get("ownerReferences", [])):
            return dict(item)
    return None


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((cond for cond in conds if cond["type"] == kind), {})


def _pods(api: Any, namespace: str, job: str) -> list[str]:
    from kubernetes import client as k8s

    selector = f"{c.OPERATOR_JOB_NAME_LABEL}={job}"
    pods = k8s.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    return [p.metadata.name for p in pods]


def _waiting(api: Any, namespace: str, job: str) -> dict[str, Any] | None:
    """The run's Workload once Kueue has looked at it and not admitted it."""
    workload = _workload(api, namespace, job)
    reserved = _condition(workload, "QuotaReserved")
    return workload if reserved.get("status") == "False" else None


def test_runs_wait_for_admission_and_for_quota(
    api: Any, helm: Helm, namespace: str, kueue: Any, tmp_path: Path
) -> None:
    queue = f"cq-{namespace}"
    kueue("localqueues", {"kind": "LocalQueue", "metadata": {"name": "lq"},
                          "spec": {"clusterQueue": queue}}, namespaced=True)  # fmt: skip
    values = {
        "training": TRAINING, "kueue": {"queueName": "lq"}, "podAnnotations": {HOLD: "true"},
        **RUN_RESOURCES,
    }  # fmt: skip
    first = _name(install(helm, "ka", namespace, values=values))

    # Suspended at creation; its Workload waits (no ClusterQueue yet); no pods.
    assert _mpijob(api, namespace, first)["spec"]["runPolicy"]["suspend"] is True
    eventually(f"{first}'s Workload, not admitted", lambda: _waiting(api, namespace, first))
    assert _pods(api, namespace, first) == []

    flavor = f"flavor-{namespace}"
    kueue("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": flavor}})
    resources = [{"name": k, "nominalQuota": v} for k, v in QUOTA.items()]
    kueue("clusterqueues", {
        "kind": "ClusterQueue",
        "metadata": {"name": queue},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": list(QUOTA),
            "flavors": [{"name": flavor, "resources": resources}],
        }]},
    })  # fmt: skip
    play = Play(api, namespace, tmp_path)
    first_launcher = play.launcher(first)  # admitted: the operator made the pods
    assert _mpijob(api, namespace, first)["spec"]["runPolicy"]["suspend"] is False

    second = _name(install(helm, "kb", namespace, values=values))
    waiting = eventually(
        f"{second}'s Workload waiting for quota", lambda: _waiting(api, namespace, second)
    )
    assert "insufficient" in _condition(waiting, "QuotaReserved").get("message", "").lower()
    assert _mpijob(api, namespace, second)["spec"]["runPolicy"]["suspend"] is True
    assert _pods(api, namespace, second) == []

    play.release(first_launcher)  # the first run ends; its quota goes to the second
    second_launcher = play.launcher(second)
    assert _condition(_mpijob(api, namespace, first), c.SUCCEEDED).get("status") == "True"
    play.release(second_launcher)
    eventually(
        f"{second} to succeed",
        lambda: _condition(_mpijob(api, namespace, second), c.SUCCEEDED).get("status") == "True",
    )


def _name(made: list[dict[str, Any]]) -> str:
    return str(next(d for d in made if d["kind"] == c.KIND)["metadata"]["name"])
