"""Start and stop the local cluster: real Kubernetes control plane, real operators, kwok nodes,
and on request a real node (node.py).

    up(state)    etcd → kube-apiserver → CRDs, namespaces, nodes → controller manager,
                 scheduler, kwok, MPI Operator, Kueue (its webhooks registered at 127.0.0.1)
                 [→ the real node: containerd, CoreDNS, kubelet]
    down(state)  the real node's pods and processes, every process by its pid file, then the
                 state folder

Everything listens on 127.0.0.1, on free ports chosen at start (``cluster.json`` keeps them),
except the MPI Operator's health check, which is fixed at :8080 upstream. ``up`` on a running
cluster returns it as it is. The admin kubeconfig is ``<state>/kubeconfig``.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deploy.localcluster import build, node, objects, pki, processes
from deploy.localcluster.addresses import KWOK_POD_RANGE, SERVICE_RANGE
from deploy.localcluster.processes import ClusterError, Proc, http_ok, wait_until

START_TIMEOUT_SECONDS = 120.0
# Pod annotations that kwok-stages.yaml reads: keep a pod Running; make a Job's pod exit 1.
HOLD_ANNOTATION = "finetune-job.local/hold"
FAIL_ANNOTATION = "finetune-job.local/fail"
MPI_OPERATOR_HEALTH_PORT = 8080  # hard-coded in mpi-operator's server.go
# A hard-coded path in Kueue: it reads a metrics certificate there whenever it does not make
# its own certificates, even with metrics off.
KUEUE_METRICS_CERTS = Path("/etc/kueue/metrics/certs")
PROCESSES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "mpi-operator",
    "kueue",
)


@dataclass(frozen=True)
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int
    kueue_webhook: int
    kueue_health: int
    kubelet: int
    kubelet_healthz: int
    coredns_ready: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*_free_ports(len(cls.__dataclass_fields__)))


@dataclass(frozen=True)
class Cluster:
    """A started cluster: where its state is, its ports, and how to reach it."""

    state: Path
    ports: Ports
    real_node: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def etcd(self) -> str:
        return f"http://127.0.0.1:{self.ports.etcd}"

    @property
    def pki(self) -> pki.Pki:
        return pki.Pki(self.state / "pki")

    def proc(self, name: str) -> Proc:
        return Proc(name, self.state)

    @property
    def processes(self) -> tuple[str, ...]:
        return PROCESSES + (node.PROCESSES if self.real_node else ())

    def logs(self) -> dict[str, Path]:
        return {name: self.proc(name).log_file for name in self.processes}

    def running(self) -> list[str]:
        return [name for name in self.processes if self.proc(name).alive()]


def load(state: Path) -> Cluster | None:
    try:
        saved = json.loads((state / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        return Cluster(state, Ports(**saved["ports"]), saved.get("real_node", False))
    except TypeError:  # written by another release of this module
        return None


def up(state: Path, bins: dict[str, Path] | None = None, real_node: bool = False) -> Cluster:
    """Start the cluster in ``state`` (reuse it if every process still runs), with a real node
    when asked for (a running cluster without one is started afresh)."""
    running = load(state)
    if (
        running is not None
        and running.real_node >= real_node
        and running.running() == list(running.processes)
    ):
        return running
    down(state)
    bins = bins or build.build()
    state.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(state.resolve(), Ports.free(), real_node)
    saved = {"ports": asdict(cluster.ports), "real_node": real_node}
    (state / "cluster.json").write_text(json.dumps(saved, indent=2))
    keys = pki.make(cluster.state / "pki")
    objects.write_kubeconfig(cluster.kubeconfig, cluster.server, keys)
    try:
        start_etcd(cluster, bins)
        start_apiserver(cluster, bins)
        objects.install(objects.api_client(cluster.kubeconfig), START_TIMEOUT_SECONDS)
        start_controllers(cluster, bins)
        if real_node:
            node.start(cluster, bins)
    except BaseException:
        down(state)
        raise
    return cluster


def down(state: Path) -> list[str]:
    """Stop every process of the cluster in ``state``, remove the folder, name what ran."""
    stopped = [name for name in reversed(node.PROCESSES) if Proc(name, state).alive()]
    if stopped or (state / "node").exists():
        node.stop(state)
    for name in reversed(PROCESSES):
        proc = Proc(name, state)
        if proc.alive():
            stopped.append(name)
        processes.stop(proc)
    shutil.rmtree(state, ignore_errors=True)
    return stopped


def start_etcd(cluster: Cluster, bins: dict[str, Path]) -> None:
    peer = f"http://127.0.0.1:{cluster.ports.etcd_peer}"
    argv: list[str | Path] = [
        bins["etcd"],
        "--name=default",
        f"--data-dir={cluster.state / 'etcd'}",
        f"--listen-client-urls={cluster.etcd}",
        f"--advertise-client-urls={cluster.etcd}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]
    proc = processes.start(cluster.state, "etcd", argv)
    wait_until(proc, "healthy /health", http_ok(f"{cluster.etcd}/health"), START_TIMEOUT_SECONDS)


def apiserver_argv(cluster: Cluster, bins: dict[str, Path]) -> list[str | Path]:
    keys = cluster.pki
    return [
        bins["kube-apiserver"],
        f"--etcd-servers={cluster.etcd}",
        f"--secure-port={cluster.ports.apiserver}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--cert-dir={cluster.state / 'apiserver'}",
        f"--tls-cert-file={keys.serving_cert}",
        f"--tls-private-key-file={keys.serving_key}",
        f"--client-ca-file={keys.ca}",
        f"--token-auth-file={keys.token_file}",
        f"--service-cluster-ip-range={SERVICE_RANGE}",
        "--allow-privileged=true",
        "--authorization-mode=Node,RBAC",  # Node: the real node's kubelet
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass",
        "--endpoint-reconciler-type=none",  # 127.0.0.1 may not be an Endpoints address
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={keys.sa_pub}",
        f"--service-account-signing-key-file={keys.sa_key}",
        # The API server reaches kwok's kubelet endpoint (pod logs) with the admin's certificate.
        f"--kubelet-client-certificate={keys.client_cert}",
        f"--kubelet-client-key={keys.client_key}",
        f"--kubelet-certificate-authority={keys.ca}",
        "--kubelet-preferred-address-types=InternalIP",
    ]


def start_apiserver(cluster: Cluster, bins: dict[str, Path]) -> Proc:
    proc = processes.start(cluster.state, "kube-apiserver", apiserver_argv(cluster, bins))
    ready = http_ok(f"{cluster.server}/readyz", ca=cluster.pki.ca, token=cluster.pki.token)
    wait_until(proc, "ready /readyz", ready, START_TIMEOUT_SECONDS)
    return proc


def restart_apiserver(cluster: Cluster, bins: dict[str, Path] | None = None) -> None:
    """Stop the API server and start it again on the same port and etcd (clients reconnect)."""
    processes.stop(cluster.proc("kube-apiserver"))
    start_apiserver(cluster, bins or build.binaries())


def start_controllers(cluster: Cluster, bins: dict[str, Path]) -> None:
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    keys = cluster.pki
    started = {
        "kube-controller-manager": processes.start(
            cluster.state,
            "kube-controller-manager",
            [
                bins["kube-controller-manager"],
                kubeconfig,
                f"--secure-port={cluster.ports.controller_manager}",
                "--bind-address=127.0.0.1",
                f"--cert-dir={cluster.state / 'controller-manager'}",
                "--leader-elect=false",
                f"--service-account-private-key-file={keys.sa_key}",
                f"--root-ca-file={keys.ca}",
                "--controllers=*",
            ],
            restart=True,
        ),
        "kube-scheduler": processes.start(
            cluster.state,
            "kube-scheduler",
            [
                bins["kube-scheduler"],
                kubeconfig,
                f"--secure-port={cluster.ports.scheduler}",
                "--bind-address=127.0.0.1",
                f"--cert-dir={cluster.state / 'scheduler'}",
                "--leader-elect=false",
            ],
            restart=True,
        ),
        "kwok": processes.start(
            cluster.state,
            "kwok",
            [
                bins["kwok"],
                kubeconfig,
                "--manage-nodes-with-annotation-selector=" + "=".join(objects.KWOK_NODE),
                # kwok v0.7.0 keeps node leases (and so Ready nodes) only with this set.
                "--node-lease-duration-seconds=40",
                f"--config={kwok_stages()}",
                f"--cidr={KWOK_POD_RANGE}",
                "--node-ip=127.0.0.1",
                f"--node-port={cluster.ports.kwok}",
                f"--server-address=127.0.0.1:{cluster.ports.kwok}",
                f"--tls-cert-file={keys.serving_cert}",
                f"--tls-private-key-file={keys.serving_key}",
                "--enable-crds=Logs",
            ],
            restart=True,
        ),
        "mpi-operator": _start_mpi_operator(cluster, bins),
        "kueue": _start_kueue(cluster, bins),
    }
    health = {
        "kube-controller-manager": f"https://127.0.0.1:{cluster.ports.controller_manager}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{cluster.ports.scheduler}/healthz",
        "mpi-operator": f"http://127.0.0.1:{MPI_OPERATOR_HEALTH_PORT}/healthz",
        "kueue": f"http://127.0.0.1:{cluster.ports.kueue_health}/readyz",
    }
    for name, url in health.items():
        wait_until(
            started[name], f"healthy {url}", http_ok(url, verify=False), START_TIMEOUT_SECONDS
        )
    api = objects.api_client(cluster.kubeconfig)
    checks: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
        ("kwok", "Ready nodes", objects.nodes_ready),
        ("mpi-operator", "its leader Lease", objects.leads),
    )
    for name, what, check in checks:
        wait_until(started[name], what, functools.partial(check, api), START_TIMEOUT_SECONDS)
    ca = cluster.pki.ca.read_bytes()
    objects.register_kueue_webhooks(api, cluster.ports.kueue_webhook, ca)


def _start_mpi_operator(cluster: Cluster, bins: dict[str, Path]) -> Proc:
    if not _port_free(MPI_OPERATOR_HEALTH_PORT):
        raise ClusterError(
            f"port {MPI_OPERATOR_HEALTH_PORT} is taken: the MPI Operator's health check binds it "
            "(no flag moves it); stop what listens there"
        )
    argv: list[str | Path] = [
        bins["mpi-operator"],
        f"--kubeConfig={cluster.kubeconfig}",
        "--lock-namespace=mpi-operator",
        "--kube-api-qps=50",
        "--kube-api-burst=100",
    ]
    # KUBECONFIG would win over --kubeConfig: leave only ours.
    return processes.start(
        cluster.state,
        "mpi-operator",
        argv,
        env=_env(KUBECONFIG=str(cluster.kubeconfig)),
        restart=True,
    )


def _start_kueue(cluster: Cluster, bins: dict[str, Path]) -> Proc:
    keys = cluster.pki
    certs = cluster.state / "kueue-certs"
    certs.mkdir(exist_ok=True)
    for folder in (certs, KUEUE_METRICS_CERTS):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(keys.serving_cert, folder / "tls.crt")
            shutil.copy(keys.serving_key, folder / "tls.key")
        except OSError as e:
            raise ClusterError(f"kueue needs its certificate in {folder}: {e.strerror}") from e
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{cluster.ports.kueue_health}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {
            "host": "127.0.0.1",
            "port": cluster.ports.kueue_webhook,
            "certDir": str(certs),
        },
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["kubeflow.org/mpijob"]},
        # On by default; it would serve another API with certificates of its own.
        "featureGates": {"VisibilityOnDemand": False},
    }
    path = cluster.state / "kueue.yaml"
    path.write_text(yaml.safe_dump(config))
    argv: list[str | Path] = [
        bins["kueue"],
        f"--config={path}",
        f"--kubeconfig={cluster.kubeconfig}",
    ]
    return processes.start(cluster.state, "kueue", argv, restart=True)


def kwok_stages() -> Path:
    return Path(str(resources.files("deploy.localcluster") / "kwok-stages.yaml"))


def _env(**extra: str) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
