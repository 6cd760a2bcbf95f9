"""Kubeflow Trainer v2's MPI layout, emulated with podman, from a `helm template` TrainJob.

No Trainer controller runs here: Trainer v2 needs JobSet, whose module versions the Go module
proxy does not list, so the local cluster cannot build it. The MPI Operator's layout needs no
emulation: the local cluster's real node runs the real operator's pods
(tests/cluster/test_real_node.py).

What Trainer's MPI plugin (kubeflow/trainer pkg/runtime/framework/plugins/mpi) and JobSet make
is reproduced here: pods `<trainjob>-<replicatedJob>-<job index>-<pod index>` with subdomain
`<trainjob>`; an ssh Secret `<trainjob>-mpi-ssh-auth` (an ECDSA P-521 "EC PRIVATE KEY" PEM and
its authorized-keys line) in every container named `node`, with the items id_rsa, id_rsa.pub
and authorized_keys; the hostfile ConfigMap `<trainjob>-mpi-hostfile` at /etc/mpi and the
OpenMPI variables on the launcher. Pods are podman containers on a network of their own; a
node's DNS name (a network alias, served by aardvark-dns) exists only while its readiness probe
passes, as the headless Service publishes only Ready pods.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podman_tools import run

# --- the MPI plugin's paths and Secret items (the MPI Operator's too) ------------------------
CONFIG_MOUNT = "/etc/mpi"
HOSTFILE = "hostfile"
# Kubernetes' defaultMode of secret and configMap volumes, when the controller sets none
VOLUME_DEFAULT_MODE = 0o644
SSH_ITEMS = (
    ("ssh-privatekey", "id_rsa"),
    ("ssh-publickey", "id_rsa.pub"),
    ("ssh-publickey", "authorized_keys"),
)


def ssh_auth_secret() -> dict[str, bytes]:
    """The ssh Secret's data: an ECDSA P-521 key, SEC1 PEM, and its authorized-keys line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP521R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return {"ssh-privatekey": private, "ssh-publickey": public + b"\n"}


@dataclass
class Pod:
    """A pod as JobSet creates it from the runtime's replicated job, with the plugin's additions."""

    name: str
    hostname: str
    subdomain: str
    spec: dict[str, Any]
    restart_policy: str
    role: str
    # the pod's DNS name once Ready (default: <hostname>.<subdomain>.<namespace>.svc)
    fqdn: str = ""

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]


@dataclass
class Cluster:
    """One namespace on one podman network: ConfigMaps and Secrets as host folders, pods as
    containers, a headless Service as network aliases of Ready nodes."""

    env: dict[str, str]
    image: str
    namespace: str
    workdir: Path
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"emu-{uuid.uuid4().hex[:8]}")
    containers: list[str] = field(default_factory=list)

    @property
    def network(self) -> str:
        return self.prefix

    def __post_init__(self) -> None:
        run(["podman", "network", "create", self.network], self.env)

    def podman(self, *args: str, timeout: float = 300, check: bool = True):  # noqa: ANN201
        return run(["podman", *args], self.env, timeout=timeout, check=check)

    def container_name(self, pod: Pod | str) -> str:
        return f"{self.prefix}-{pod.name if isinstance(pod, Pod) else pod}"

    def ip(self, name: str) -> str:
        info = json.loads(self.podman("inspect", name).stdout)[0]
        return info["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    # --- volumes -------------------------------------------------------------------------
    def _files(self, name: str, files: dict[str, tuple[bytes, int]], fs_group: int | None) -> str:
        """A folder holding a ConfigMap's or Secret's items, as the kubelet writes them: owned
        by root; with a pod fsGroup, group fsGroup and group read added (read-only volume)."""
        folder = self.workdir / "volumes" / f"{name}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        folder.chmod(0o755)
        for path, (data, mode) in files.items():
            target = folder / path
            target.write_bytes(data)
            if fs_group is not None:
                import os

                os.chown(target, 0, fs_group)
                mode |= 0o440
            target.chmod(mode)
        return str(folder)

    def _volume_args(self, pod: Pod) -> list[str]:
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        sources = {v["name"]: v for v in pod.spec.get("volumes", [])}
        args: list[str] = []
        for mount in pod.container.get("volumeMounts", []):
            source = sources[mount["name"]]
            path = mount["mountPath"]
            if "configMap" in source or "secret" in source:
                kind = "configMap" if "configMap" in source else "secret"
                ref = source[kind]
                name = ref["name"] if kind == "configMap" else ref["secretName"]
                data = self.config_maps[name] if kind == "configMap" else self.secrets[name]
                default = ref.get("defaultMode", VOLUME_DEFAULT_MODE)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                files = {}
                for item in items:
                    raw = data[item["key"]]
                    raw = raw.encode() if isinstance(raw, str) else raw
                    files[item["path"]] = (raw, item.get("mode", default))
                args += ["-v", f"{self._files(name, files, fs_group)}:{path}:ro"]
            elif "emptyDir" in source and path == "/dev/shm":
                args += ["--shm-size", source["emptyDir"].get("sizeLimit", "64Mi")]
            elif "emptyDir" in source:
                args += ["--tmpfs", path]
            else:
                raise NotImplementedError(f"volume {mount['name']}: {source}")
        return args

    # --- pods ----------------------------------------------------------------------------
    def _env_args(self, container: dict[str, Any]) -> list[str]:
        args = []
        for item in container.get("env", []):
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]].decode()
            else:
                value = item.get("value", "")
            args += ["-e", f"{item['name']}={value}"]
        return args

    def _security_args(self, pod: Pod) -> list[str]:
        pod_sc = pod.spec.get("securityContext", {})
        sc = pod.container.get("securityContext", {})
        args = []
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap.lower()]
        return args

    def _resource_args(self, container: dict[str, Any]) -> list[str]:
        limits = container.get("resources", {}).get("limits", {})
        args = []
        if "cpu" in limits:
            cpu = str(limits["cpu"])
            args += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
        if "memory" in limits:
            memory = str(limits["memory"])
            for suffix, unit in (("Gi", "g"), ("Mi", "m"), ("Ki", "k")):
                memory = memory.replace(suffix, unit)
            args += ["--memory", memory]
        return args

    def create(self, pod: Pod, args: list[str] | None = None) -> str:
        """`podman create` of the pod's first container (not started, no DNS name yet)."""
        name = self.container_name(pod)
        container = pod.container
        command = container.get("command")
        cmd = [
            "create",
            "--name",
            name,
            "--hostname",
            pod.hostname,
            "--network",
            self.network,
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            "--stop-timeout",
            str(pod.spec.get("terminationGracePeriodSeconds", 30)),
            *self._security_args(pod),
            *self._resource_args(container),
            *self._env_args(container),
            *self._volume_args(pod),
        ]
        if command:
            cmd += ["--entrypoint", json.dumps(command)]
        cmd += [self.image, *(args if args is not None else container.get("args", []))]
        self.podman(*cmd)
        self.containers.append(name)
        return name

    def start(self, pod: Pod) -> None:
        self.podman("start", self.container_name(pod))

    def is_ready(self, pod: Pod) -> bool:
        """The rendered readinessProbe (tcpSocket), as the kubelet runs it."""
        probe = pod.container["readinessProbe"]["tcpSocket"]
        proc = self.podman(
            "exec",
            self.container_name(pod),
            "bash",
            "-c",
            f"exec 3<>/dev/tcp/127.0.0.1/{probe['port']}",
            check=False,
            timeout=30,
        )
        return proc.returncode == 0

    def state(self, pod: Pod) -> dict[str, Any]:
        return json.loads(self.podman("inspect", self.container_name(pod)).stdout)[0]["State"]

    def publish(self, pod: Pod) -> None:
        """The headless Service lists a Ready pod: its name resolves from now on."""
        name = self.container_name(pod)
        self.podman("network", "disconnect", self.network, name)
        alias = pod.fqdn or f"{pod.hostname}.{pod.subdomain}.{self.namespace}.svc"
        self.podman("network", "connect", "--alias", alias, self.network, name)

    def unpublish(self, pod: Pod) -> None:
        name = self.container_name(pod)
        self.podman("network", "disconnect", self.network, name, check=False)
        self.podman("network", "connect", self.network, name, check=False)

    def wait_ready_and_publish(self, pod: Pod, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready(pod):
            state = self.state(pod)
            assert state["Running"], f"{pod.name} exited {state['ExitCode']}: {self.logs(pod)}"
            assert time.monotonic() < deadline, f"{pod.name} not Ready in {timeout} s"
            time.sleep(0.5)
        self.publish(pod)

    def logs(self, pod: Pod | str) -> str:
        proc = self.podman("logs", self.container_name(pod), check=False)
        return proc.stdout + proc.stderr

    def exec(self, pod: Pod, script: str, timeout: float = 120) -> str:
        return self.podman(
            "exec", self.container_name(pod), "bash", "-c", script, timeout=timeout
        ).stdout

    def run_launcher(
        self, launcher: Pod, attempt: int, args: list[str] | None = None, timeout=1800
    ):
        """One launcher pod of the launcher Job, run to its end: (exit code, log)."""
        pod = Pod(
            f"{launcher.name}-{attempt}",
            launcher.hostname,
            launcher.subdomain,
            launcher.spec,
            launcher.restart_policy,
            "launcher",
        )
        name = self.create(pod, args)
        try:
            proc = self.podman("start", "--attach", name, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.podman("kill", name, check=False)
            raise
        return proc.returncode, proc.stdout + proc.stderr

    def close(self) -> None:
        for name in reversed(self.containers):
            self.podman("rm", "-f", "-t", "0", name, check=False)
        self.podman("network", "rm", "-f", self.network, check=False)


def shell_quote(args: list[str]) -> str:
    return shlex.join(args)


# --- Kubeflow Trainer v2's MPI plugin (kubeflow/trainer pkg/runtime/framework/plugins/mpi) ---
TRAINER_SSH_SECRET_SUFFIX = "-mpi-ssh-auth"
TRAINER_SSH_VOLUME = "mpi-ssh-auth"
TRAINER_HOSTFILE_SUFFIX = "-mpi-hostfile"
TRAINER_HOSTFILE_VOLUME = "mpi-hostfile"
TRAINER_CONTAINER = "node"  # the plugin touches only containers of this name


def trainer_hostfile_text(trainjob: str, nodes: int, slots: int) -> str:
    """buildHostFileConfigMap: the `node` pod set's JobSet endpoints, `slots=numProcPerNode`."""
    return "".join(f"{trainjob}-node-0-{i}.{trainjob} slots={slots}\n" for i in range(nodes))


def trainer_launcher_env(slots: int) -> list[dict[str, str]]:
    pairs = [
        ("OMPI_MCA_orte_default_hostfile", f"{CONFIG_MOUNT}/{HOSTFILE}"),
        ("OMPI_MCA_orte_keep_fqdn_hostnames", "true"),
        ("OMPI_MCA_orte_set_default_slots", str(slots)),
        ("OMPI_MCA_plm_rsh_args", "-o ConnectionAttempts=10"),
    ]
    return [{"name": n, "value": v} for n, v in pairs]


def trainer_pods(runtime: dict[str, Any], trainjob: dict[str, Any]) -> tuple[list[Pod], Pod]:
    """The pods of the JobSet Trainer makes from the runtime for the TrainJob: JobSet names
    each pod `<jobset>-<replicatedJob>-<job index>-<pod index>` with subdomain `<jobset>`;
    EnforceMLPolicy adds the ssh Secret to the `node` containers, and the hostfile ConfigMap
    and the OpenMPI variables to the launcher's."""
    import copy

    name = trainjob["metadata"]["name"]
    mpi = runtime["spec"]["mlPolicy"]["mpi"]
    nodes = int(trainjob["spec"]["trainer"]["numNodes"])
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}

    def pod(job: str, index: int) -> Pod:
        spec = copy.deepcopy(jobs[job]["template"]["spec"]["template"]["spec"])
        container = spec["containers"][0]
        if container["name"] == TRAINER_CONTAINER:
            spec.setdefault("volumes", []).append(
                {
                    "name": TRAINER_SSH_VOLUME,
                    "secret": {
                        "secretName": name + TRAINER_SSH_SECRET_SUFFIX,
                        "items": [{"key": k, "path": p} for k, p in SSH_ITEMS],
                    },
                }
            )
            container.setdefault("volumeMounts", []).append(
                {"name": TRAINER_SSH_VOLUME, "mountPath": mpi["sshAuthMountPath"]}
            )
            if job == "launcher":
                spec["volumes"].append(
                    {
                        "name": TRAINER_HOSTFILE_VOLUME,
                        "configMap": {
                            "name": name + TRAINER_HOSTFILE_SUFFIX,
                            "items": [{"key": HOSTFILE, "path": HOSTFILE, "mode": 0o444}],
                        },
                    }
                )
                container["volumeMounts"].append(
                    {"name": TRAINER_HOSTFILE_VOLUME, "mountPath": CONFIG_MOUNT}
                )
                container.setdefault("env", []).extend(
                    trainer_launcher_env(int(mpi["numProcPerNode"]))
                )
        hostname = f"{name}-{job}-0-{index}"
        policy = spec.get("restartPolicy", "Never")
        return Pod(hostname, hostname, name, spec, policy, job, fqdn=f"{hostname}.{name}")

    return [pod("node", i) for i in range(nodes)], pod("launcher", 0)
