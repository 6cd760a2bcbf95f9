"""The objects the local cluster is made of on its API server, and the checks it waits on.

The CRDs (from the components' own modules), the operators' namespaces, kwok's nodes,
Kueue's webhook configurations (its own, pointed at 127.0.0.1), the admin kubeconfig.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import yaml

from deploy.localcluster import build, components, pki
from deploy.localcluster.processes import ClusterError

NODES = ("kwok-node-0", "kwok-node-1")
NODE_CAPACITY = {"cpu": "32", "memory": "256Gi", "pods": "110"}
KWOK_NODE = ("kwok.x-k8s.io/node", "fake")
NAMESPACES = ("mpi-operator", "kueue-system")  # the operator's leader Lease; Kueue's own
# Kueue's webhooks for the kinds this cluster uses (its manifests also list pods, Deployments,
# ... for frameworks that are off here; registering those would put every pod behind Kueue).
KUEUE_WEBHOOK_KINDS = {"mpijobs", "workloads", "clusterqueues", "resourceflavors", "cohorts"}


def install(api: Any, timeout: float) -> None:
    """The CRDs the controllers serve, their namespaces and the fake nodes."""
    from kubernetes import client as k8s

    ext = k8s.ApiextensionsV1Api(api)
    crds = upstream_crds()
    for crd in crds:
        _create(lambda body=crd: ext.create_custom_resource_definition(body))
    core: Any = k8s.CoreV1Api(api)
    for ns in NAMESPACES:
        _create(lambda ns=ns: core.create_namespace({"metadata": {"name": ns}}))
    for node in NODES:
        _create(lambda node=node: core.create_node(_node(node)))
    names = {crd["metadata"]["name"] for crd in crds}
    deadline = time.monotonic() + timeout
    while not names <= _established(ext):
        if time.monotonic() > deadline:
            missing = sorted(names - _established(ext))
            raise ClusterError(f"CRDs not established within {timeout:.0f} s: {missing}")
        time.sleep(0.2)


def upstream_crds() -> list[dict[str, Any]]:
    """The CRDs of ``components.CRD_FILES``, read from the downloaded modules."""
    docs = []
    for module, version, pattern in components.CRD_FILES:
        folder = build.module_dir(module, version)
        for path in sorted(_expand(folder, pattern)):
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _expand(folder: Path, pattern: str) -> list[Path]:
    """``glob`` with one ``{a,b}`` alternation, which Path.glob lacks."""
    if "{" not in pattern:
        return list(folder.glob(pattern))
    head, rest = pattern.split("{", 1)
    choices, tail = rest.split("}", 1)
    return [p for choice in choices.split(",") for p in folder.glob(head + choice + tail)]


def kueue_webhooks(port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's own webhook configurations, pointed at 127.0.0.1 instead of its Service."""
    manifests = (
        build.module_dir("sigs.k8s.io/kueue", components.KUEUE)
        / "config/components/webhook/manifests.yaml"
    )
    configs = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        hooks = []
        for hook in doc["webhooks"]:
            if not {r for rule in hook["rules"] for r in rule["resources"]} & KUEUE_WEBHOOK_KINDS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca_bundle).decode(),
            }
            hooks.append(hook)
        doc["metadata"] = {"name": "kueue-" + doc["metadata"]["name"]}
        doc["webhooks"] = hooks
        configs.append(doc)
    return configs


def register_kueue_webhooks(api: Any, port: int, ca_bundle: bytes) -> None:
    from kubernetes import client as k8s

    reg = k8s.AdmissionregistrationV1Api(api)
    for doc in kueue_webhooks(port, ca_bundle):
        create = (
            reg.create_mutating_webhook_configuration
            if doc["kind"] == "MutatingWebhookConfiguration"
            else reg.create_validating_webhook_configuration
        )
        _create(lambda create=create, doc=doc: create(doc))


def write_kubeconfig(path: Path, server: str, keys: pki.Pki, token: str | None = None) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "finetune-job-local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(keys.ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "admin", "user": {"token": token or keys.token}}],
        "contexts": [
            {
                "name": "finetune-job-local",
                "context": {"cluster": "finetune-job-local", "user": "admin"},
            }
        ],
        "current-context": "finetune-job-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def _node(name: str) -> dict[str, Any]:
    key, value = KWOK_NODE
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {"allocatable": NODE_CAPACITY, "capacity": NODE_CAPACITY},
    }


def api_client(kubeconfig: Path) -> Any:
    from kubernetes import config as k8s_config

    return k8s_config.new_client_from_config(config_file=str(kubeconfig))


def _create(call: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as e:
        if e.status != 409:
            raise ClusterError(f"creating an object failed: {e.status} {e.reason}: {e.body}") from e


def _established(ext: Any) -> set[str]:
    return {
        crd.metadata.name
        for crd in ext.list_custom_resource_definition().items
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])
    }


def nodes_ready(api: Any) -> bool:
    from kubernetes import client as k8s

    core: Any = k8s.CoreV1Api(api)
    nodes = core.list_node().items
    ready = {
        n.metadata.name
        for n in nodes
        if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
    }
    return set(NODES) <= ready


def leads(api: Any) -> bool:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        coordination: Any = k8s.CoordinationV1Api(api)
        lease = coordination.read_namespaced_lease("mpi-operator", "mpi-operator")
    except ApiException:
        return False  # not written yet
    return bool(lease.spec.holder_identity)
