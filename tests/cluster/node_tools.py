"""Helpers of the tests on the real node: host services that pods reach by cluster names, the
job's data in S3, and a Prometheus that discovers pods as the chart's PodMonitor selects them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prometheus_tools as prom
import yaml

from deploy.localcluster import build
from deploy.localcluster.addresses import NODE_IP

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "node-test", "AWS_SECRET_ACCESS_KEY": "node-test"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on the node's address."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((NODE_IP, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def host_process(
    name: str, argv: list[str], ready_url: str, logs: Path, **env: str
) -> Iterator[str]:
    """A process on the node's address (where the pods reach it), until the block ends."""
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}: {log.read_text()[-800:]}")
            prom.get(ready_url, timeout=2)
            return True

        prom.wait_for(name, ready, timeout=60)
        yield ready_url
    finally:
        prom.stop(proc)


def moto(port: int, logs: Path) -> Any:
    argv = [sys.executable, "-m", "moto.server", "-H", NODE_IP, "-p", str(port)]
    # moto reads a dotted Host as <bucket>.<endpoint>; the job's clients use paths
    url = f"http://{NODE_IP}:{port}/moto-api/"
    return host_process("moto", argv, url, logs, S3_IGNORE_SUBDOMAIN_BUCKETNAME="true")


def pushgateway(port: int, logs: Path) -> Any:
    argv = [prom.binary("prometheus-pushgateway"), f"--web.listen-address={NODE_IP}:{port}"]
    return host_process("pushgateway", argv, f"http://{NODE_IP}:{port}/-/ready", logs)


def service_for_host(api: Any, namespace: str, name: str, port: int) -> str:
    """A headless Service with an EndpointSlice on the node's address: ``name.namespace.svc``
    resolves in the pods, as a cluster's own service would. Its DNS name."""
    from kubernetes import client as k8s

    k8s.CoreV1Api(api).create_namespaced_service(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": port}]},
        },
    )
    k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice(
        namespace,
        {
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "finetune-job.tests",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    )
    return f"{name}.{namespace}.svc"


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def prepare_data(endpoint: str, folder: Path) -> tuple[str, str]:
    """Shards of a small two-class dataset (the demo's shapes) and a source model (trained from
    scratch, one epoch, in this process's venv) in S3: (data URI, source model URI)."""
    from job.demo import TARGET_SHAPES, draw_dataset

    env = {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
    images = folder / "images"
    two = dict(list(TARGET_SHAPES.items())[:2])
    draw_dataset(str(images), two, per_class=48, size=72)
    cli = str(Path(sys.executable).parent / "finetune-job")
    data, source = "s3://data/shapes", "s3://models/source"
    for argv in (
        [cli, "prepare", str(images), data, "--resize", "72", "--val-fraction", "0.25"]
        + ["--workers", "1", "--s3-endpoint-url", endpoint],
        [cli, "train", "--data", data, "--output", source, "--pretrained", "none"]
        + ["--image-size", "32", "--batch-size", "8", "--epochs", "1", "--metrics-port", "0"]
        + ["--s3-endpoint-url", endpoint, "--no-onnx"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return data, f"{source}/model.params"


def scrape_config(podmonitor: dict[str, Any], server: str, ca: Path, token: Path) -> dict:
    """The Prometheus scrape job the Prometheus Operator makes of a PodMonitor (pod discovery
    in its namespaces, kept by its label selector and port name, then its relabelings)."""
    spec = podmonitor["spec"]
    endpoint = spec["podMetricsEndpoints"][0]
    keep = [
        {
            "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(key)}"],
            "regex": value,
            "action": "keep",
        }
        for key, value in spec["selector"]["matchLabels"].items()
    ]
    keep.append(
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        }
    )
    targets = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    targets += [
        {
            "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(label)}"],
            "target_label": _sanitize(label),
        }
        for label in spec.get("podTargetLabels", [])
    ]
    extra = [
        {
            "source_labels": r["sourceLabels"],
            "target_label": r["targetLabel"],
            "action": r.get("action", "replace"),
        }
        for r in endpoint.get("relabelings", [])
    ]
    return {
        "job_name": f"podMonitor/{podmonitor['metadata']['name']}",
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint.get("scrapeTimeout", endpoint["interval"]),
        "metrics_path": endpoint["path"],
        "kubernetes_sd_configs": [
            {
                "role": "pod",
                "api_server": server,
                "tls_config": {"ca_file": str(ca)},
                "authorization": {"credentials_file": str(token)},
                "namespaces": {"names": spec["namespaceSelector"]["matchNames"]},
            }
        ],
        "relabel_configs": keep + targets + extra,
    }


def _sanitize(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label)


@contextmanager
def prometheus(scrape: dict, rules: list[dict[str, Any]], folder: Path) -> Iterator[str]:
    """Debian's Prometheus with one scrape job and the rule groups; its base URL."""
    port = prom.free_port()
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rules}))
    config = {
        "global": {"evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "scrape_configs": [scrape],
    }
    (folder / "prometheus.yaml").write_text(yaml.safe_dump(config))
    argv = [
        str(build.binaries()["prometheus"]),
        f"--config.file={folder / 'prometheus.yaml'}",
        f"--storage.tsdb.path={folder / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with prom.server(argv, port, str(folder / "prometheus.log")) as base:
        yield base
