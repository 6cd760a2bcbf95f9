"""Helpers of the tests against the local cluster: helm, run values, bounded polling."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from chart_tools import CHART

from deploy.localcluster import cluster

# The pod annotations the cluster's kwok stages read: hold a pod Running; fail a Job's pod.
HOLD = cluster.HOLD_ANNOTATION
FAIL = cluster.FAIL_ANNOTATION

# The chart's required values, for a run that kwok plays (nothing is read or written).
TRAINING = {"data": "s3://datasets/flowers", "output": "s3://runs/flowers"}
WAIT_SECONDS = 120.0

# helm("install", "r", "-n", ns, values={...}, files=(...)): the `helm` fixture.
Helm = Callable[..., str]


def install(
    helm: Helm,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    files: tuple[Path, ...] = (),
) -> list[dict[str, Any]]:
    """`helm install` of the chart; the objects it made (its manifest)."""
    helm("install", release, str(CHART), "-n", namespace, values=values, files=files)
    return [
        doc for doc in yaml.safe_load_all(helm("get", "manifest", release, "-n", namespace)) if doc
    ]


def run_values(**extra: Any) -> dict[str, Any]:
    """Values of a small run on the kwok nodes (requests they can fit)."""
    values: dict[str, Any] = {
        "training": dict(TRAINING),
        "workers": {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def eventually(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    """Poll until ``check`` returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.25)


def write_values(path: Path, values: Mapping[str, Any]) -> Path:
    """A values file (annotation values stay strings, as `--set` would not keep them)."""
    path.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
    return path


class Play:
    """The test's part in a run on the kwok nodes: what the launcher's container would do.

    kwok plays the pods' states; what a real launcher writes (its log, summary.json in the
    run's output) the test writes, then lets the launcher exit (removes the hold annotation).
    """

    def __init__(self, api: Any, namespace: str, logs_dir: Path) -> None:
        from kubernetes import client as k8s

        self.core: Any = k8s.CoreV1Api(api)
        self.custom: Any = k8s.CustomObjectsApi(api)
        self.namespace = namespace
        self.logs_dir = logs_dir

    def launcher(self, job: str, timeout: float = WAIT_SECONDS) -> str:
        """The name of the run's Running launcher pod (waits for it)."""
        from deploy import constants as c

        selector = (
            f"{c.OPERATOR_JOB_NAME_LABEL}={job},{c.OPERATOR_JOB_ROLE_LABEL}={c.LAUNCHER_ROLE}"
        )

        def running() -> str:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
            names = [p.metadata.name for p in pods if p.status.phase == "Running"]
            return names[0] if names else ""

        return str(eventually(f"a Running launcher of {job}", running, timeout))

    def log(self, pod: str, lines: list[str], container: str = "launcher") -> None:
        """Serve ``lines`` as the pod's container log (kwok's Logs, in the CRI log format)."""
        path = self.logs_dir / f"{self.namespace}-{pod}.log"
        stamp = "2026-01-01T00:00:00.000000000Z"
        path.write_text("".join(f"{stamp} stdout F {line}\n" for line in lines))
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {"name": pod, "namespace": self.namespace},
            "spec": {"logs": [{"containers": [container], "logsFile": str(path), "follow": False}]},
        }
        self.custom.create_namespaced_custom_object(
            "kwok.x-k8s.io", "v1alpha1", self.namespace, "logs", body
        )

    def output(self, job: str) -> str:
        """The run's output folder, from its MPIJob."""
        from deploy import constants as c

        obj = self.custom.get_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL, job
        )
        return str(obj["metadata"]["annotations"][c.OUTPUT_ANNOTATION])

    def release(self, pod: str) -> None:
        """Let the held pod's containers exit (kwok's pod-complete or pod-fail stage)."""
        patch = {"metadata": {"annotations": {HOLD: None}}}
        self.core.patch_namespaced_pod(pod, self.namespace, patch)


def token_kubeconfig(api: Any, namespace: str, account: str, folder: Path) -> str:
    """A kubeconfig with a token of the ServiceAccount (what its pod would be given)."""
    from kubernetes import client as k8s

    core: Any = k8s.CoreV1Api(api)
    request = {"spec": {"audiences": [], "expirationSeconds": 3600}}
    token = core.create_namespaced_service_account_token(account, namespace, request).status.token
    ca = Path(api.configuration.ssl_ca_cert).read_bytes()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": api.configuration.host,
            "certificate-authority-data": base64.b64encode(ca).decode(),
        }}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {
            "cluster": "c", "user": "u", "namespace": namespace,
        }}],
        "current-context": "c",
    }  # fmt: skip
    path = folder / f"{account}-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def install_release(helm: Helm, namespace: str, values_file: Path) -> None:
    """`helm install` of the chart without a run (its ServiceAccount, ...), as `submit` needs,
    under the release name `submit` renders by default."""
    from deploy import manifest

    helm("install", manifest.CHART, str(CHART), "-n", namespace, "-f", str(values_file),
         "--set", "runOnInstall=false")  # fmt: skip


def submit_run(helm: Helm, namespace: str, kubeconfig: str, values: Mapping[str, Any]) -> Any:
    """(client, run): a run of the installed release as Helm renders it, submitted through
    the Python client."""
    from deploy import manifest
    from deploy.client import MPIJobClient

    text = helm("template", manifest.CHART, str(CHART), "-n", namespace, values=values)
    run = manifest.build_run(manifest.parse(text, "helm template"), namespace=namespace)
    client = MPIJobClient(namespace, kubeconfig=kubeconfig, request_timeout=10)
    client.submit(run.job, run.config_map)
    return client, run
