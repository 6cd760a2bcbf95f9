"""The local cluster's real node: a kubelet with Debian's containerd, runc and CNI plugins, and
CoreDNS, so that the pods the MPI Operator creates run for real on this machine.

    start(cluster)        bridge → containerd (+ the pause image) → CoreDNS → kubelet → Ready
    load_image(cluster)   an image from podman's store (or a docker-archive) into containerd
    stop(cluster)         the node's pods, then kubelet, CoreDNS, containerd, mounts, bridge

The pods live on a bridge of their own (addresses.py): they reach each other and the node's
address, where CoreDNS answers and host processes for the pods (an S3 server, a Pushgateway)
can listen; nothing else. The node
is tainted (``NODE_TAINT``), so only pods that tolerate it run here; the kwok nodes keep the
rest. This machine's cgroups are v1 and its PID 1 is no systemd: the kubelet uses cgroupfs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deploy.localcluster import images, objects, processes
from deploy.localcluster.addresses import BRIDGE, CLUSTER_DOMAIN, NODE_IP, NODE_NAME, POD_SUBNET
from deploy.localcluster.processes import ClusterError, Proc, wait_until

if TYPE_CHECKING:
    from deploy.localcluster.cluster import Cluster

NODE_TAINT = {"key": "finetune-job.local/real-node", "value": "true", "effect": "NoSchedule"}
CNI_BIN = "/usr/lib/cni"  # where Debian's containernetworking-plugins puts them
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins")
PROCESSES = ("containerd", "coredns", "kubelet")
START_TIMEOUT_SECONDS = 120.0
DRAIN_TIMEOUT_SECONDS = 60.0
CAP_SYS_RESOURCE = 24  # linux/capability.h


def missing_packages() -> list[str]:
    """The Debian packages the node needs that are not installed (apt-get install them)."""
    wanted = {"containerd": "containerd", "runc": "runc", f"{CNI_BIN}/bridge": APT_PACKAGES[2]}
    return sorted(
        {pkg for tool, pkg in wanted.items() if not (shutil.which(tool) or Path(tool).exists())}
    )


class Paths:
    """Where the node keeps its state, inside the cluster's state folder."""

    def __init__(self, state: Path) -> None:
        self.root = state / "node"
        self.containerd = self.root / "containerd"
        self.socket = self.containerd / "containerd.sock"
        self.cni_conf = self.root / "cni" / "net.d"
        self.kubelet = self.root / "kubelet"
        self.coredns = self.root / "coredns"


def start(cluster: Cluster, bins: dict[str, Path]) -> None:
    """Start the node on a running control plane and wait until it is Ready."""
    missing = missing_packages()
    if missing:
        names = " ".join(missing)
        raise ClusterError(f"the real node needs Debian's {names}: apt-get install {names}")
    paths = Paths(cluster.state)
    _bridge_up()
    _start_containerd(cluster, paths)
    pause = images.pause_archive(bins["pause"], paths.root)
    images.import_archive(paths.socket, pause, "the pause image")
    _start_coredns(cluster, bins, paths)
    kubelet = _start_kubelet(cluster, bins, paths)
    api = objects.api_client(cluster.kubeconfig)
    wait_until(kubelet, f"node {NODE_NAME} Ready", lambda: node_ready(api), START_TIMEOUT_SECONDS)


def _bridge_up() -> None:
    """The pods' bridge with the node's address (the CNI bridge plugin then uses it)."""
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    addresses = _ip("-j", "addr", "show", BRIDGE).stdout
    if NODE_IP not in addresses:
        _ip("addr", "add", f"{NODE_IP}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _start_containerd(cluster: Cluster, paths: Paths) -> Proc:
    paths.cni_conf.mkdir(parents=True, exist_ok=True)
    paths.containerd.mkdir(parents=True, exist_ok=True)
    (paths.cni_conf / "10-finetune-job.conflist").write_text(json.dumps(_cni(paths), indent=2))
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    config = f"""\
version = 2
root = "{paths.containerd / "root"}"
state = "{paths.containerd / "state"}"

[grpc]
  address = "{paths.socket}"

[ttrpc]
  address = "{paths.socket}.ttrpc"

[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  # The kubelet asks for oom_score_adj below containerd's own (-998 for sandboxes); lowering it
  # needs CAP_SYS_RESOURCE, which a sandboxed machine may not grant: keep them at ours or above.
  restrict_oom_score_adj = {str(not _has_sys_resource()).lower()}
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{paths.cni_conf}"
"""
    path = paths.containerd / "config.toml"
    path.write_text(config)
    proc = processes.start(cluster.state, "containerd", ["containerd", f"--config={path}"])
    wait_until(
        proc,
        "its socket",
        lambda: images.ctr(paths.socket, "version", check=False).returncode == 0,
        60,
    )
    return proc


def _has_sys_resource() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (it may lower oom_score_adj)."""
    status = Path("/proc/self/status").read_text()
    effective = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff")), 16
    )
    return bool(effective >> CAP_SYS_RESOURCE & 1)


def _cni(paths: Paths) -> dict[str, Any]:
    """One bridge, host-local addresses, no default route and no masquerading."""
    return {
        "cniVersion": "0.4.0",
        "name": "finetune-job",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            }
        ],
    }


def corefile(kubeconfig: Path, ready_port: int) -> str:
    """The cluster's zones only: any other name is refused at once (pods reach nothing else).
    Every plugin it names is one that components.COREDNS_PLUGINS links in."""
    return f"""{CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
    cache 5
}}
"""


def _start_coredns(cluster: Cluster, bins: dict[str, Path], paths: Paths) -> Proc:
    ready = cluster.ports.coredns_ready
    paths.coredns.mkdir(parents=True, exist_ok=True)
    path = paths.coredns / "Corefile"
    path.write_text(corefile(cluster.kubeconfig, ready))
    proc = processes.start(cluster.state, "coredns", [bins["coredns"], "-conf", path], restart=True)
    ready_url = f"http://127.0.0.1:{ready}/ready"
    wait_until(proc, "ready", processes.http_ok(ready_url), START_TIMEOUT_SECONDS)
    return proc


def _start_kubelet(cluster: Cluster, bins: dict[str, Path], paths: Paths) -> Proc:
    keys = cluster.pki
    paths.kubelet.mkdir(parents=True, exist_ok=True)
    resolv = paths.kubelet / "resolv.conf"
    resolv.write_text("")  # the pods get the cluster's DNS and nothing of this machine's
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": cluster.ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": cluster.ports.kubelet_healthz,
        "tlsCertFile": str(keys.serving_cert),
        "tlsPrivateKeyFile": str(keys.serving_key),
        # Only the API server (it shows a certificate of the cluster's CA) talks to it.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(keys.ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",  # no systemd here
        "failCgroupV1": False,  # this machine's cgroups are v1
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{paths.socket}",
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv),
        "registerWithTaints": [NODE_TAINT],
        "makeIPTablesUtilChains": False,  # the machine's firewall stays as it is
        # Never evict or collect images on a shared workstation's disk: the images were
        # imported, and nothing could pull them again.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 16,
    }
    path = paths.kubelet / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    kubeconfig = paths.kubelet / "kubeconfig"
    objects.write_kubeconfig(kubeconfig, cluster.server, keys, token=keys.node_token)
    argv: list[str | Path] = [
        bins["kubelet"],
        f"--config={path}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet / 'root'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        f"--node-labels=type=real,{NODE_TAINT['key']}=true",
    ]
    return processes.start(cluster.state, "kubelet", argv, restart=True)


def node_ready(api: Any) -> bool:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        node: Any = k8s.CoreV1Api(api).read_node(NODE_NAME)
    except ApiException:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def load_image(cluster: Cluster, image: str, env: dict[str, str] | None = None) -> str:
    """Import ``image`` from podman's store into the node (once per image ID); its ID."""
    paths = Paths(cluster.state)
    return images.load(paths.socket, paths.root, image, env)


def stop(state: Path) -> None:
    """Take the node down without leaving a process, mount or network namespace behind.

    With the API server up, the node's pods are deleted first and the kubelet stops them (their
    sandboxes' network namespaces go with them); whatever still runs after that is killed."""
    paths = Paths(state)
    if Proc("kubelet", state).alive() and Proc("kube-apiserver", state).alive():
        _drain(state / "kubeconfig")
    for name in ("kubelet", "coredns"):
        processes.stop(Proc(name, state))
    for pid in _pod_processes():
        _kill(pid)
    processes.stop(Proc("containerd", state))
    for pid in _shims(paths):
        _kill(pid)
    _unmount_under(paths.root)
    _ip("link", "del", BRIDGE, check=False)


def leftovers(state: Path) -> list[str]:
    """What a stopped node would have left behind: pod processes, shims, mounts, the bridge."""
    paths = Paths(state)
    found = [f"pod process {pid}" for pid in _pod_processes()]
    found += [f"containerd shim {pid}" for pid in _shims(paths)]
    found += [f"mount {target}" for target in _mounts_under(paths.root)]
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    return found


def _drain(kubeconfig: Path) -> None:
    from kubernetes import client as k8s

    try:
        core: Any = k8s.CoreV1Api(objects.api_client(kubeconfig))
        selector = f"spec.nodeName={NODE_NAME}"
        for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
            core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
            )
    except Exception:  # noqa: BLE001 (the kill below still stops the pods)
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while _pod_processes() and time.monotonic() < deadline:
        time.sleep(0.5)


CGROUP_ROOT = Path("/sys/fs/cgroup/pids/kubepods")


def _pod_processes() -> list[int]:
    """Processes in the kubelet's pod cgroups (cgroupfs driver, v1 hierarchy)."""
    pids: set[int] = set()
    if CGROUP_ROOT.exists():
        for procs in CGROUP_ROOT.rglob("cgroup.procs"):
            try:
                pids |= {int(p) for p in procs.read_text().split()}
            except OSError:
                continue
    return sorted(pids)


def _shims(paths: Paths) -> list[int]:
    """containerd's shims for this node (they outlive containerd by design)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"containerd-shim-runc-v2")
            and str(paths.socket).encode() in b" ".join(cmdline)
        ):
            found.append(int(entry.name))
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _unmount_under(root: Path) -> None:
    """Every mount below ``root`` (rootfs overlays, shm, secrets), deepest first."""
    for target in sorted(set(_mounts_under(root)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done
