"""What the real MPI Operator creates from the chart's MPIJob, against what the podman
emulation in tests/image assumes.

The emulation (tests/image/operator_emulation.py) is the one description of the operator's
layout that the image tests run pods by: its constants and ``controller_pods`` say which
names, ConfigMap keys, Secret items, modes, env, mounts and hostnames the operator gives each
pod. Here the real operator builds the same run, and every one of those facts is compared
with the objects it made, so the emulation cannot drift from the controller.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from chart_tools import one
from cluster_tools import HOLD, Helm, eventually, install, run_values
from operator_emulation import (
    CONFIG_SUFFIX,
    DISCOVER_HOSTS,
    HOSTFILE,
    LAUNCHER_SUFFIX,
    SSH_ITEMS,
    SSH_SECRET_SUFFIX,
    VOLUME_DEFAULT_MODE,
    Pod,
    controller_pods,
    discover_hosts_text,
    hostfile_text,
    worker_name,
)

from deploy import constants as c

WORKERS = 2
SLOTS = 1


@pytest.fixture
def held_run(helm: Helm, namespace: str, api: Any) -> dict[str, Any]:
    """A 2-worker run whose launcher kwok keeps Running; its rendered MPIJob."""
    values = run_values(
        slotsPerWorker=SLOTS, workers={"replicas": WORKERS}, podAnnotations={HOLD: "true"}
    )
    made = install(helm, "op", namespace, values=values)
    return one(made, c.KIND)


def _objects(api: Any, namespace: str, kind: str) -> list[dict[str, Any]]:
    from kubernetes import dynamic

    resource = dynamic.DynamicClient(api).resources.get(api_version="v1", kind=kind)
    return [item.to_dict() for item in resource.get(namespace=namespace).items]


def _pods(api: Any, namespace: str, role: str) -> list[dict[str, Any]]:
    pods = [
        p
        for p in _objects(api, namespace, "Pod")
        if p["metadata"].get("labels", {}).get(c.OPERATOR_JOB_ROLE_LABEL) == role
        and p.get("status", {}).get("phase") == "Running"
    ]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def _with_api_defaults(expected: Pod) -> dict[str, Any]:
    """The emulated pod's first container and volumes as the API server stores them: volumes
    of Secrets and ConfigMaps get defaultMode 0644 when none is set, an empty env value is
    left out."""
    spec = copy.deepcopy(expected.spec)
    for volume in spec.get("volumes", []):
        for kind in ("secret", "configMap"):
            if kind in volume:
                volume[kind].setdefault("defaultMode", VOLUME_DEFAULT_MODE)
    container = spec["containers"][0]
    container["env"] = [
        {k: v for k, v in item.items() if not (k == "value" and v == "")}
        for item in container.get("env", [])
    ]
    return spec


def _compare(real: dict[str, Any], expected: Pod) -> None:
    want = _with_api_defaults(expected)
    got = real["spec"]
    assert got["hostname"] == expected.hostname
    assert got["subdomain"] == expected.subdomain
    assert got["containers"][0]["env"] == want["containers"][0]["env"]
    assert got["containers"][0]["volumeMounts"] == want["containers"][0]["volumeMounts"]
    assert got["containers"][0]["command"] == want["containers"][0]["command"]
    assert got["volumes"] == want["volumes"]


def test_the_operator_makes_what_the_emulation_assumes(
    held_run: dict[str, Any], api: Any, namespace: str
) -> None:
    job = held_run["metadata"]["name"]
    workers = eventually(
        f"{WORKERS} Running workers",
        lambda: (pods := _pods(api, namespace, "worker")) and len(pods) == WORKERS and pods,
    )
    launchers = eventually("a Running launcher", lambda: _pods(api, namespace, "launcher"))
    expected_workers, expected_launcher = controller_pods(held_run)

    assert [p["metadata"]["name"] for p in workers] == [worker_name(job, i) for i in range(WORKERS)]
    for real, expected in zip(workers, expected_workers, strict=True):
        _compare(real, expected)
    (launcher,) = launchers
    assert launcher["metadata"]["name"].startswith(job + LAUNCHER_SUFFIX + "-")  # the Job's pod
    _compare(launcher, expected_launcher)

    config = {m["metadata"]["name"]: m for m in _objects(api, namespace, "ConfigMap")}[
        job + CONFIG_SUFFIX
    ]["data"]
    assert config[HOSTFILE] == hostfile_text(job, namespace, WORKERS, SLOTS)
    # Every worker is Running, so every one is listed.
    running = [p["metadata"]["name"] for p in workers]
    assert eventually(
        "discover_hosts.sh listing the Running workers",
        lambda: (
            _config(api, namespace, job)[DISCOVER_HOSTS]
            == discover_hosts_text(job, namespace, running)
        ),
    )

    secret = {s["metadata"]["name"]: s for s in _objects(api, namespace, "Secret")}[
        job + SSH_SECRET_SUFFIX
    ]
    assert secret["type"] == "kubernetes.io/ssh-auth"
    assert set(secret["data"]) == {key for key, _ in SSH_ITEMS}
    private, public = _decoded(secret, "ssh-privatekey"), _decoded(secret, "ssh-publickey")
    assert private.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert public.startswith(b"ecdsa-sha2-nistp521 ") and public.endswith(b"\n")
    _assert_key_pair(private, public)

    service = {s["metadata"]["name"]: s for s in _objects(api, namespace, "Service")}[job]
    assert service["spec"]["clusterIP"] == "None"  # headless: <pod>.<job>.<ns>.svc names


def _config(api: Any, namespace: str, job: str) -> dict[str, str]:
    return {m["metadata"]["name"]: m for m in _objects(api, namespace, "ConfigMap")}[
        job + CONFIG_SUFFIX
    ]["data"]


def _decoded(secret: dict[str, Any], key: str) -> bytes:
    import base64

    return base64.b64decode(secret["data"][key])


def _assert_key_pair(private: bytes, public: bytes) -> None:
    """The public key is the private key's, in the emulation's authorized-keys form."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private, password=None)
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert public == line + b"\n"
