"""`helm install` trains for real: the chart's MPIJob on the local cluster's real node.

The real MPI Operator makes the pods from the chart's MPIJob; the kubelet runs them in
containerd from the CPU image: sshd in the workers, mpirun in the launcher, one rank in each
worker. S3 (moto) and a Pushgateway are processes on the node's address that the pods reach by
Service names (``s3.<ns>.svc``, ``pushgateway.<ns>.svc``), as on a cluster. Debian's Prometheus
finds the worker pods through ``kubernetes_sd_configs`` against this API server, selected as
the chart's PodMonitor selects them, and evaluates the chart's alert rules on what it scraped.

The second run loses a worker pod mid-epoch: the launcher fails, the operator makes the worker
again, the launcher Job's retry resumes from the checkpoint, and every epoch is in the history
exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_tools as prom
import pytest
from chart_tools import one
from cluster_tools import eventually, install
from node_tools import (
    CREDENTIALS,
    free_ports,
    moto,
    prepare_data,
    prometheus,
    pushgateway,
    s3_client,
    scrape_config,
    service_for_host,
)
from podman_tools import build_cpu_image, podman_ready

from deploy.client import MPIJobClient
from deploy.constants import LAUNCHER_ROLE, OPERATOR_JOB_NAME_LABEL, OPERATOR_JOB_ROLE_LABEL
from deploy.localcluster import node
from deploy.localcluster.addresses import NODE_IP, NODE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RUN_SECONDS = 1200.0  # a bound on one run of the CPU image on 2 cores, never reached


@dataclass(frozen=True)
class Storage:
    s3_port: int
    pushgateway_port: int
    s3: Any
    data: str
    source_model: str


@pytest.fixture(scope="module")
def node_image(local_cluster: Any) -> str:
    """The CPU image (podman, cached layers), imported into the node's containerd."""
    env = podman_ready()
    image = build_cpu_image(env)
    node.load_image(local_cluster, image, env)
    return image


@pytest.fixture(scope="module")
def storage(local_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    folder = tmp_path_factory.mktemp("node-services")
    s3_port, pushgateway_port = free_ports(2)
    with moto(s3_port, folder), pushgateway(pushgateway_port, folder):
        endpoint = f"http://{NODE_IP}:{s3_port}"
        s3 = s3_client(endpoint)
        for bucket in ("data", "models", "runs"):
            s3.create_bucket(Bucket=bucket)
        data, source = prepare_data(endpoint, folder)
        yield Storage(s3_port, pushgateway_port, s3, data, source)


def _values(api: Any, namespace: str, storage: Storage, image: str, **training: Any) -> dict:
    """The CPU scenario on the real node: 2 workers of 1 slot, S3 and the Pushgateway by
    their Service names, the PodMonitor and the alert rules on."""
    from kubernetes import client as k8s

    s3 = service_for_host(api, namespace, "s3", storage.s3_port)
    gateway = service_for_host(api, namespace, "pushgateway", storage.pushgateway_port)
    k8s.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": "finetune-s3"}, "stringData": CREDENTIALS}
    )
    repository, tag = image.rsplit(":", 1)
    placement = {
        "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
        "tolerations": [{**node.NODE_TAINT, "operator": "Equal"}],
    }
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "slotsPerWorker": 1,
        "launcher": {**placement, "waitForHostsSeconds": 300},
        "workers": {
            **placement,
            "replicas": 2,
            "shmSize": "256Mi",
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
        },
        "runPolicy": {"backoffLimit": 3},
        "terminationGracePeriodSeconds": 30,
        "s3": {
            "endpoint": f"http://{s3}:{storage.s3_port}",
            "region": "us-east-1",
            "existingSecret": "finetune-s3",
        },
        "metrics": {
            "podMonitor": {"enabled": True, "interval": "1s", "scrapeTimeout": "1s"},
            "prometheusRule": {"enabled": True},
        },
        "training": {
            "data": storage.data,
            "pretrained": storage.source_model,
            "image_size": 32,
            "batch_size": 4,
            "lr": 0.002,
            "log_interval": 1,
            "onnx": False,
            "pushgateway": f"http://{gateway}:{storage.pushgateway_port}",
            **training,
        },
    }


@dataclass
class RealRun:
    """A test's runs on the real node, in its namespace, through helm and the client."""

    api: Any
    namespace: str
    helm: Any
    kubeconfig: str
    image: str
    storage: Storage

    def install(self, **training: Any) -> tuple[list[dict[str, Any]], str]:
        """`helm install` of a run: its objects and the MPIJob's name."""
        values = _values(self.api, self.namespace, self.storage, self.image, **training)
        docs = install(self.helm, "real", self.namespace, values)
        return docs, one(docs, "MPIJob")["metadata"]["name"]

    def wait(self, job: str) -> str:
        client = MPIJobClient(self.namespace, kubeconfig=self.kubeconfig, request_timeout=10)
        return client.wait(job, timeout=RUN_SECONDS).phase

    def logs(self, job: str) -> str:
        cli = str(Path(sys.executable).parent / "finetune-job")
        argv = [cli, "logs", job, "-n", self.namespace, "--kubeconfig", self.kubeconfig]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def summary(self, output: str) -> dict:
        key = output.removeprefix("s3://runs/") + "/summary.json"
        return json.loads(self.storage.s3.get_object(Bucket="runs", Key=key)["Body"].read())

    def keys(self, output: str) -> set[str]:
        prefix = output.removeprefix("s3://runs/") + "/"
        listed = self.storage.s3.list_objects_v2(Bucket="runs", Prefix=prefix)
        return {o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])}


@pytest.fixture
def real(
    api: Any, namespace: str, helm: Any, kubeconfig: str, node_image: str, storage: Storage
) -> RealRun:
    return RealRun(api, namespace, helm, kubeconfig, node_image, storage)


def test_helm_install_trains_two_ranks_in_the_operators_pods(
    local_cluster: Any, real: RealRun, tmp_path: Path
) -> None:
    output = "s3://runs/first"
    docs, job = real.install(output=output, epochs=2)
    podmonitor, rule = one(docs, "PodMonitor"), one(docs, "PrometheusRule")
    token = tmp_path / "token"
    token.write_text(local_cluster.pki.token)
    scrape = scrape_config(podmonitor, local_cluster.server, local_cluster.pki.ca, token)
    with prometheus(scrape, rule["spec"]["groups"], tmp_path) as base:
        assert real.wait(job) == "Succeeded"
        # every worker pod was scraped while it trained, selected as the PodMonitor selects
        scraped = _series(base, f'{{__name__=~"finetune_.+",run="{job}"}}')
        assert {s["pod"] for s in scraped} == {f"{job}-worker-0", f"{job}-worker-1"}
        # the chart's rules load and evaluate on those series
        groups = eventually("evaluated rules", lambda: _evaluated_rules(base))
        assert {
            r.get("alert", r.get("record")) for g in rule["spec"]["groups"] for r in g["rules"]
        } == {r["name"] for g in groups for r in g["rules"]}

    summary = real.summary(output)
    assert summary["workers"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert {"model.params", "eval.json", "summary.json"} <= real.keys(output)
    logs = real.logs(job)
    assert "epoch 2/2 done" in logs
    # the ranks ran in the worker pods the operator made (mpirun over their sshd)
    for rank in (0, 1):
        assert f"rank {rank} of 2 on {job}-worker-{rank}" in logs
    pushed = prom.get(f"http://{NODE_IP}:{real.storage.pushgateway_port}/metrics")
    assert 'rank="0"' in pushed and 'rank="1"' in pushed


def _series(base: str, match: str) -> list[dict[str, str]]:
    """Every series Prometheus stored that ``match`` selects (any time in the last hour)."""
    query = urllib.parse.urlencode({"match[]": match, "start": time.time() - 3600})
    return json.loads(prom.get(f"{base}/api/v1/series?{query}"))["data"]


def _evaluated_rules(base: str) -> list[dict]:
    """The rule groups once every rule has been evaluated without error, else []."""
    groups = json.loads(prom.get(f"{base}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    healthy = rules and all(
        r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules
    )
    return groups if healthy else []


def test_a_worker_pod_deleted_mid_epoch_costs_no_epoch(real: RealRun) -> None:
    from kubernetes import client as k8s

    output, epochs = "s3://runs/fault", 8
    _, job = real.install(output=output, epochs=epochs)
    core: Any = k8s.CoreV1Api(real.api)
    eventually(
        "the first checkpoint", lambda: "checkpoints/latest" in real.keys(output), RUN_SECONDS
    )
    victim = f"{job}-worker-1"
    before = core.read_namespaced_pod(victim, real.namespace).metadata.uid
    core.delete_namespaced_pod(victim, real.namespace, grace_period_seconds=0)
    eventually(
        "the operator's new worker pod",
        lambda: _uid(core, victim, real.namespace) not in (None, before),
    )
    assert real.wait(job) == "Succeeded"

    history = real.summary(output)["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    # the first launcher failed and the Job tried again: a new pod, or (restartPolicy
    # OnFailure) the same pod's container once more
    selector = f"{OPERATOR_JOB_NAME_LABEL}={job},{OPERATOR_JOB_ROLE_LABEL}={LAUNCHER_ROLE}"
    launchers = core.list_namespaced_pod(real.namespace, label_selector=selector).items
    tries = sum(1 + s.restart_count for p in launchers for s in p.status.container_statuses)
    assert tries >= 2, tries
    logs = real.logs(job)
    assert "resumed from" in logs, logs[-3000:]
    assert f"epoch {epochs}/{epochs} done" in logs


def _uid(core: Any, pod: str, namespace: str) -> str | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return str(core.read_namespaced_pod(pod, namespace).metadata.uid)
    except ApiException:
        return None
