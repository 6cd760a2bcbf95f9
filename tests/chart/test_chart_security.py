"""Least privilege in effect: the submit account deletes MPIJobs only when asked to, and an
optional NetworkPolicy lets only the run's own pods reach sshd and only the monitoring
namespace reach the metrics ports. Real helm; built-in kinds validated strictly."""

from __future__ import annotations

from typing import Any

import pytest
from chart_tools import HelmError, by_kind, one, render, replica_pod, validate_builtin

BASE = {"training": {"output": "s3://b/o", "synthetic": True}}
SCHEDULED = {**BASE, "schedule": "0 3 * * 0"}


def mpijob_verbs(docs: list[dict[str, Any]]) -> set[str]:
    role = one(docs, "Role")
    (rule,) = [r for r in role["rules"] if "mpijobs" in r["resources"]]
    return set(rule["verbs"])


def submit_command(docs: list[dict[str, Any]]) -> list[str]:
    cron = one(docs, "CronJob")
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_the_submit_account_cannot_delete_mpijobs_by_default(helm):
    docs = render(helm, SCHEDULED)
    assert mpijob_verbs(docs) == {"create", "get", "list", "watch"}
    assert "--delete-after" not in submit_command(docs)


def test_delete_after_grants_delete_and_passes_the_flag(helm):
    docs = render(helm, {**SCHEDULED, "cronJob": {"deleteAfter": True}})
    assert "delete" in mpijob_verbs(docs)
    assert "--delete-after" in submit_command(docs)
    validate_builtin(one(docs, "Role"))


def test_delete_after_through_extra_args_is_refused(helm):
    values = {**SCHEDULED, "cronJob": {"extraArgs": ["--timeout", "60", "--delete-after"]}}
    with pytest.raises(HelmError, match="extraArgs"):
        render(helm, values)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
    return True


def pod_labels(docs: list[dict[str, Any]], role: str) -> dict[str, str]:
    return replica_pod(one(docs, "MPIJob"), role)["metadata"]["labels"]


def test_no_network_policy_unless_enabled(helm):
    assert not by_kind(render(helm, BASE), "NetworkPolicy")


@pytest.mark.parametrize("slots", [1, 2])
def test_the_network_policy_admits_only_the_runs_pods_and_the_monitoring_namespace(helm, slots):
    values = {**BASE, "slotsPerWorker": slots, "networkPolicy": {"enabled": True}}
    docs = render(helm, values)
    policy = one(docs, "NetworkPolicy")
    validate_builtin(policy)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # everything not admitted below is refused
    launcher, worker = pod_labels(docs, "Launcher"), pod_labels(docs, "Worker")
    assert selects(spec["podSelector"], launcher) and selects(spec["podSelector"], worker)

    own, monitoring = spec["ingress"]
    (peer,) = own["from"]
    assert set(peer) == {"podSelector"}  # this namespace, these pods; no namespace-wide peer
    assert selects(peer["podSelector"], launcher) and selects(peer["podSelector"], worker)
    other_release = pod_labels(render(helm, values, release="other"), "Worker")
    assert not selects(peer["podSelector"], other_release)
    assert not selects(peer["podSelector"], {**worker, "app.kubernetes.io/component": "x"})

    (ns_peer,) = monitoring["from"]
    assert ns_peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    container = replica_pod(one(docs, "MPIJob"), "Worker")["spec"]["containers"][0]
    metrics_ports = {p["containerPort"] for p in container["ports"]}
    assert len(metrics_ports) == slots
    assert {p["port"] for p in monitoring["ports"]} == metrics_ports
    assert 2222 not in metrics_ports  # sshd is never open to the monitoring namespace


def test_without_metrics_only_the_runs_own_pods_get_in(helm):
    values = {
        "training": {**BASE["training"], "metrics_port": 0},
        "networkPolicy": {"enabled": True, "monitoringNamespace": "prom"},
    }
    policy = one(render(helm, values), "NetworkPolicy")
    assert len(policy["spec"]["ingress"]) == 1
