"""The chart's MPIJob run the way the MPI Operator runs it: separate worker and launcher
containers of the CPU image, laid out as mpi-operator v0.8's controller does (see
operator_emulation.py), with S3 (moto) and a Pushgateway reached by their cluster DNS names.

The run shows that:
- every name, path, mode and variable of the controller is where the chart's image expects
  it (each checked inside the containers against the rendered MPIJob);
- a worker whose sshd comes up late is waited for by the launcher (AtStartup, as with Kueue's
  resume), not failed on;
- the ranks run in the worker containers (their hostnames, and the training processes there);
- killing a worker container mid-run fails the launcher; the kubelet restarts the worker
  (restartPolicy OnFailure), the launcher Job's next pod resumes from the S3 checkpoint and
  the outputs land in S3; the Pushgateway gets the final push.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import prometheus_tools
import pytest
from chart_tools import by_kind, find_or_install_helm, one, render
from operator_emulation import (
    Cluster,
    controller_pods,
    discover_hosts_text,
    hostfile_text,
    ssh_auth_secret,
    trainer_hostfile_text,
    trainer_pods,
    worker_fqdn,
)

NAMESPACE, RELEASE = "ml", "emu"
S3_NAME, S3_PORT = "moto.storage.svc", 5000
PUSHGATEWAY_NAME, PUSHGATEWAY_PORT = "pushgateway.monitoring.svc", 9091
CREDENTIALS = {"AWS_ACCESS_KEY_ID": b"emulated", "AWS_SECRET_ACCESS_KEY": b"emulated"}
EPOCHS = 12
MAKE_IMAGES = """
import os, sys, cv2, numpy as np
rng = np.random.default_rng(0)
for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
    os.makedirs(f"{sys.argv[1]}/class{c}", exist_ok=True)
    for i in range(16):
        img = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype("uint8")
        cv2.imwrite(f"{sys.argv[1]}/class{c}/{i}.jpg", img)
"""


def chart_values(image: str) -> dict:
    repository, tag = image.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        # The launcher starts with the workers, as after Kueue's resume (mpi-operator#615):
        # only its own wait keeps mpirun from a worker that is not up yet.
        "launcherCreationPolicy": "AtStartup",
        "slotsPerWorker": 1,
        "workers": {
            "replicas": 2,
            "restartPolicy": "OnFailure",
            "shmSize": "256Mi",
            "resources": {"limits": {"cpu": "1", "memory": "3Gi"}},
        },
        "launcher": {"waitForHostsSeconds": 300},
        "runPolicy": {"backoffLimit": 2},
        "terminationGracePeriodSeconds": 30,
        "s3": {
            "endpoint": f"http://{S3_NAME}:{S3_PORT}",
            "region": "us-east-1",
            "existingSecret": "finetune-s3",
        },
        "training": {
            "data": "s3://data/shapes",
            "output": "s3://runs/emulated",
            "pretrained": "none",
            "head_lr_mult": 1.0,
            "image_size": 32,
            "batch_size": 4,
            "epochs": EPOCHS,
            "lr": 0.002,
            "log_interval": 1,
            "pushgateway": f"http://{PUSHGATEWAY_NAME}:{PUSHGATEWAY_PORT}",
        },
    }


def _s3(endpoint: str):  # noqa: ANN202
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="emulated",
        aws_secret_access_key="emulated",
        region_name="us-east-1",
    )


def _wait_for(what: str, check, timeout: float = 120, every: float = 0.5):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _services(cluster: Cluster) -> tuple[str, str]:
    """moto and the Pushgateway in containers on the job's network, by their cluster names.
    moto runs from this venv's site-packages (same Python 3.11, glibc) in the job image."""
    host_site = site.getsitepackages()[0]
    s3 = cluster.service(
        "s3",
        S3_NAME,
        ["python", "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)],
        [f"{host_site}:/opt/host-site:ro"],
        # moto reads a dotted Host as <bucket>.<endpoint>; AWS-style clients here use paths
        {"PYTHONPATH": "/opt/host-site", "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"},
    )
    cluster.podman("exec", s3, "true")
    binary = prometheus_tools.binary("prometheus-pushgateway")  # apt-installs it if missing
    pushgateway = cluster.service(
        "pushgateway",
        PUSHGATEWAY_NAME,
        ["/usr/bin/prometheus-pushgateway", f"--web.listen-address=:{PUSHGATEWAY_PORT}"],
        [f"{binary}:/usr/bin/prometheus-pushgateway:ro"],
    )
    return s3, pushgateway


def _prepare_dataset(tmp_path: Path, endpoint: str) -> None:
    images = tmp_path / "images"
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="emulated",
        AWS_SECRET_ACCESS_KEY="emulated",
        AWS_DEFAULT_REGION="us-east-1",
    )
    subprocess.run([sys.executable, "-c", MAKE_IMAGES, str(images)], check=True, timeout=120)
    cli = Path(sys.executable).parent / "finetune-job"
    subprocess.run(
        [str(cli), "prepare", str(images), "s3://data/shapes", "--resize", "40"]
        + ["--val-fraction", "0.25", "--workers", "1", "--s3-endpoint-url", endpoint],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
    )


def _proc_environ(cluster: Cluster, pod, pid: str = "1") -> dict[str, str]:  # noqa: ANN001
    raw = cluster.exec(pod, f"tr '\\0' '\\n' < /proc/{pid}/environ 2>/dev/null || true")
    return dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)


def _expected_env(container: dict, secrets: dict) -> dict[str, str]:
    out = {}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            out[item["name"]] = secrets[ref["name"]][ref["key"]].decode()
        else:
            out[item["name"]] = item.get("value", "")
    return out


def _check_worker_layout(cluster, mpijob, pod, index, public_key, config_text):  # noqa: ANN001
    """The worker pod as the controller makes it, checked against the rendered MPIJob and the
    controller's own literals."""
    job = mpijob["metadata"]["name"]
    template = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    container = template["containers"][0]
    assert cluster.exec(pod, "hostname").strip() == f"{job}-worker-{index}"
    ids = cluster.exec(pod, "id -u; id -g; id -G").split()
    security = template["securityContext"]
    assert ids[:2] == [str(security["runAsUser"]), str(security["runAsGroup"])]
    assert str(security["fsGroup"]) in ids[2:]
    cmdline = cluster.exec(pod, "tr '\\0' '\\n' < /proc/1/cmdline").splitlines()
    assert cmdline == container["command"]
    environ = _proc_environ(cluster, pod)
    expected = _expected_env(container, cluster.secrets)
    assert {k: environ.get(k) for k in expected} == expected
    assert environ["K_MPI_JOB_ROLE"] == "worker"
    assert "OMPI_MCA_orte_default_hostfile" not in environ
    status = cluster.exec(pod, "grep -E '^(CapEff|NoNewPrivs)' /proc/1/status").split()
    assert status == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    _check_ssh_files(cluster, mpijob, pod, public_key)
    assert cluster.exec(pod, "cat /etc/finetune-job/config.yaml") == config_text


def _check_ssh_files(cluster, mpijob, pod, public_key):  # noqa: ANN001
    """The Secret at sshAuthMountPath: id_rsa, id_rsa.pub, authorized_keys; root-owned, group
    fsGroup, mode 0644 (the controller leaves defaultMode unset off /root/.ssh)."""
    path = mpijob["spec"]["sshAuthMountPath"]
    group = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["securityContext"][
        "fsGroup"
    ]
    stats = cluster.exec(
        pod, f"cd {path} && stat -c '%n %u %g %a' id_rsa id_rsa.pub authorized_keys"
    )
    assert stats.split("\n")[:3] == [
        f"id_rsa 0 {group} 644",
        f"id_rsa.pub 0 {group} 644",
        f"authorized_keys 0 {group} 644",
    ]
    assert cluster.exec(pod, f"cat {path}/authorized_keys") == public_key
    assert cluster.exec(pod, f"cat {path}/id_rsa.pub") == public_key
    assert "BEGIN EC PRIVATE KEY" in cluster.exec(pod, f"head -1 {path}/id_rsa")


LAUNCHER_PROBE = r"""
hostname
id -u
stat -c '%n %u %a' /etc/mpi/hostfile /etc/mpi/discover_hosts.sh
echo ---
cat /etc/mpi/hostfile
echo ---
/etc/mpi/discover_hosts.sh
echo ---
env | grep -E '^(K_MPI_JOB_ROLE|OMPI_MCA_orte_|OMPI_MCA_plm_rsh_args|NVIDIA_)' | sort
echo ---
"""


def _check_launcher_layout(cluster, mpijob, launcher, command, workers) -> None:  # noqa: ANN001
    """A launcher pod of the same template, its mpirun line replaced by a look around and by
    `hostname` on every rank (the rendered flags, so the controller's env places the ranks)."""
    job = mpijob["metadata"]["name"]
    slots = mpijob["spec"]["slotsPerWorker"]
    replicas = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    mpirun = command[: command.index("finetune-job")]
    script = LAUNCHER_PROBE + " ".join(mpirun) + " hostname"
    code, log = cluster.run_launcher(launcher, 0, ["bash", "-c", script], timeout=600)
    assert code == 0, log
    out = log[log.index(f"{job}-launcher") :]
    head, hostfile, discover, env, ranks = out.split("---\n")
    lines = head.splitlines()
    runas = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["securityContext"]
    assert lines[:4] == [
        f"{job}-launcher",
        str(runas["runAsUser"]),
        "/etc/mpi/hostfile 0 444",
        "/etc/mpi/discover_hosts.sh 0 555",
    ]
    assert hostfile == "".join(
        f"{job}-worker-{i}.{job}.{NAMESPACE}.svc slots={slots}\n" for i in range(replicas)
    )
    assert discover.splitlines() == [
        f"{job}-worker-{i}.{job}.{NAMESPACE}.svc" for i in range(replicas)
    ]
    assert env.splitlines() == sorted(
        [
            "K_MPI_JOB_ROLE=launcher",
            "NVIDIA_DRIVER_CAPABILITIES=",
            "NVIDIA_VISIBLE_DEVICES=",
            "OMPI_MCA_orte_default_hostfile=/etc/mpi/hostfile",
            "OMPI_MCA_orte_keep_fqdn_hostnames=true",
            f"OMPI_MCA_orte_set_default_slots={slots}",
        ]
        + ["OMPI_MCA_plm_rsh_args=-o ConnectionAttempts=10"]
    )
    # every rank of the rendered mpirun line runs in a worker container, none on the launcher
    reported = sorted(line for line in ranks.splitlines() if line.startswith(job))
    assert reported == [f"{job}-worker-{i}" for i in range(replicas) for _ in range(slots)]
    assert "waiting for" in log and f"all {replicas} MPI hosts answer" in log


def _training_ranks(cluster, workers) -> dict[str, str]:  # noqa: ANN001
    """OMPI_COMM_WORLD_RANK of the `finetune-job train` process in each worker container."""
    found = {}
    for pod in workers:
        # [f]: the pattern does not match the shell that runs pgrep
        pids = cluster.exec(pod, "pgrep -f '[f]inetune-job train' || true").split()
        for pid in pids:
            environ = _proc_environ(cluster, pod, pid)
            if "OMPI_COMM_WORLD_RANK" in environ:
                found[cluster.exec(pod, "hostname").strip()] = environ["OMPI_COMM_WORLD_RANK"]
    return found


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chart_runs_as_the_mpi_operator_lays_it_out(podman, cpu_image, tmp_path):
    helm = find_or_install_helm()
    docs = render(helm, chart_values(cpu_image), release=RELEASE, namespace=NAMESPACE)
    mpijob = one(docs, "MPIJob")
    job = mpijob["metadata"]["name"]
    slots = mpijob["spec"]["slotsPerWorker"]
    launcher_container = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"][
        "containers"
    ][0]
    command = launcher_container["args"]
    assert mpijob["spec"]["launcherCreationPolicy"] == "AtStartup"
    assert mpijob["spec"]["mpiImplementation"] == "OpenMPI"

    secret = ssh_auth_secret()
    cluster = Cluster(podman, cpu_image, NAMESPACE, tmp_path)
    cluster.config_maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    cluster.secrets = {job + "-ssh": secret, "finetune-s3": CREDENTIALS}
    try:
        s3_container, pushgateway = _services(cluster)
        endpoint = f"http://{cluster.ip(s3_container)}:{S3_PORT}"
        s3 = _s3(endpoint)
        _wait_for("moto", lambda: _try(lambda: s3.list_buckets()))
        for bucket in ("data", "runs"):
            s3.create_bucket(Bucket=bucket)
        _prepare_dataset(tmp_path, endpoint)

        workers, launcher = controller_pods(mpijob)
        for pod in workers:
            cluster.create(pod)
        # the controller's ConfigMap (hostfile, discover_hosts.sh of the running workers)
        cluster.config_maps[job + "-config"] = {
            "hostfile": hostfile_text(job, NAMESPACE, len(workers), slots),
            "discover_hosts.sh": discover_hosts_text(job, NAMESPACE, [p.name for p in workers]),
        }
        # worker-0 starts now, worker-1's sshd only 20 s later (a slow node, an image pull)
        cluster.start(workers[0])
        cluster.wait_ready_and_publish(workers[0])
        late = threading.Timer(20, lambda: cluster.start(workers[1]))
        late.start()
        publisher = threading.Thread(
            target=lambda: (late.join(), cluster.wait_ready_and_publish(workers[1]))
        )
        publisher.start()
        assert not cluster.state(workers[1])["Running"]  # the launcher starts before it
        _check_launcher_layout(cluster, mpijob, launcher, command, workers)
        publisher.join(timeout=600)

        public_key = secret["ssh-publickey"].decode()
        config_text = cluster.config_maps[f"{job}-training"]["config.yaml"]
        for i, pod in enumerate(workers):
            _check_worker_layout(cluster, mpijob, pod, i, public_key, config_text)
        resolved = cluster.exec(workers[0], f"getent hosts {worker_fqdn(job, NAMESPACE, 1)}")
        assert resolved.split()[0] == cluster.ip(cluster.container_name(workers[1]))

        # launch 1: the rendered mpirun line; worker-1 is killed once a checkpoint is in S3
        result: dict[str, tuple[int, str]] = {}
        first = threading.Thread(
            target=lambda: result.__setitem__(1, cluster.run_launcher(launcher, 1))
        )
        first.start()
        pointer = "emulated/checkpoints/latest"
        _wait_for(
            "the first checkpoint",
            lambda: (
                _try(lambda: s3.head_object(Bucket="runs", Key=pointer)) or not first.is_alive()
            ),
            timeout=1200,
        )
        assert first.is_alive(), result[1][1][-4000:] if 1 in result else None
        ranks = _training_ranks(cluster, workers)
        assert ranks == {f"{job}-worker-0": "0", f"{job}-worker-1": "1"}
        cluster.podman("kill", cluster.container_name(workers[1]))
        first.join(timeout=900)
        code, log = result[1]
        assert code != 0, log[-3000:]
        assert not _try(lambda: s3.head_object(Bucket="runs", Key="emulated/summary.json"))

        # the kubelet restarts worker-1 (OnFailure); the Job's next launcher pod resumes
        assert cluster.sync_workers(workers) == [f"{job}-worker-1"]
        backoff = mpijob["spec"]["runPolicy"]["backoffLimit"]
        attempts = 1
        while True:
            attempts += 1
            code, log = cluster.run_launcher(launcher, attempts)
            if code == 0 or attempts > backoff:
                break
            cluster.sync_workers(workers)
        assert code == 0, log[-5000:]
        assert "resumed from" in log
        summary = json.loads(
            s3.get_object(Bucket="runs", Key="emulated/summary.json")["Body"].read()
        )
        assert summary["workers"] == 2
        assert len(summary["history"]) == EPOCHS
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"]}
        assert "emulated/model-symbol.json" in keys

        # both ranks pushed their final metrics to the Pushgateway, by its cluster name
        metrics = _http_get(f"http://{cluster.ip(pushgateway)}:{PUSHGATEWAY_PORT}/metrics")
        assert "finetune_" in metrics and 'rank="0"' in metrics and 'rank="1"' in metrics
    finally:
        cluster.close()
    remaining = cluster.podman("ps", "-a", "--filter", f"name={cluster.prefix}", "-q").stdout
    assert remaining.strip() == ""


def _try(call):  # noqa: ANN001, ANN202
    try:
        return call() or True
    except Exception:  # noqa: BLE001 (not there yet)
        return False


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (test network)
        return response.read().decode()


TRAINER_PROBE = r"""
hostname
stat -c '%n %u %a' /etc/mpi/hostfile
echo ---
cat /etc/mpi/hostfile
echo ---
env | grep -E '^OMPI_MCA_(orte_|plm_rsh_args)' | sort
echo ---
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trainjob_runs_as_trainers_mpi_plugin_lays_it_out(podman, cpu_image, tmp_path):
    """The TrainJob target: node pods `<trainjob>-node-0-<i>` (JobSet's names), Trainer's ssh
    Secret and hostfile ConfigMap on the containers named `node`, its OpenMPI variables on the
    launcher; the rendered mpirun line's ranks land on the nodes."""
    helm = find_or_install_helm()
    values = chart_values(cpu_image)
    values["launch"] = {"kind": "TrainJob"}
    values["launcherCreationPolicy"] = "WaitForWorkersReady"  # dependsOn: node Ready
    docs = render(helm, values, release=RELEASE, namespace=NAMESPACE)
    runtime, trainjob = one(docs, "TrainingRuntime"), one(docs, "TrainJob")
    name = trainjob["metadata"]["name"]
    mpi = runtime["spec"]["mlPolicy"]["mpi"]
    slots = mpi["numProcPerNode"]
    nodes, launcher = trainer_pods(runtime, trainjob)
    assert len(nodes) == trainjob["spec"]["trainer"]["numNodes"] == 2

    secret = ssh_auth_secret()
    cluster = Cluster(podman, cpu_image, NAMESPACE, tmp_path)
    cluster.config_maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    cluster.config_maps[name + "-mpi-hostfile"] = {
        "hostfile": trainer_hostfile_text(name, len(nodes), slots)
    }
    cluster.secrets = {name + "-mpi-ssh-auth": secret, "finetune-s3": CREDENTIALS}
    try:
        for pod in nodes:
            cluster.create(pod)
            cluster.start(pod)
        for pod in nodes:
            cluster.wait_ready_and_publish(pod)
        for i, pod in enumerate(nodes):
            assert cluster.exec(pod, "hostname").strip() == f"{name}-node-0-{i}"
            _check_ssh_files(
                cluster, runtime_as_mpijob(runtime), pod, secret["ssh-publickey"].decode()
            )
        command = launcher.container["args"]
        script = TRAINER_PROBE + " ".join(command[: command.index("finetune-job")]) + " hostname"
        code, log = cluster.run_launcher(launcher, 0, ["bash", "-c", script], timeout=600)
        assert code == 0, log
        out = log[log.index(f"{name}-launcher-0-0") :]
        head, hostfile, env, ranks = out.split("---\n")
        assert head.splitlines() == [f"{name}-launcher-0-0", "/etc/mpi/hostfile 0 444"]
        assert hostfile == "".join(
            f"{name}-node-0-{i}.{name} slots={slots}\n" for i in range(len(nodes))
        )
        assert env.splitlines() == [
            "OMPI_MCA_orte_default_hostfile=/etc/mpi/hostfile",
            "OMPI_MCA_orte_keep_fqdn_hostnames=true",
            f"OMPI_MCA_orte_set_default_slots={slots}",
            "OMPI_MCA_plm_rsh_args=-o ConnectionAttempts=10",
        ]
        reported = sorted(line for line in ranks.splitlines() if line.startswith(name))
        assert reported == [f"{name}-node-0-{i}" for i in range(len(nodes)) for _ in range(slots)]
    finally:
        cluster.close()


def runtime_as_mpijob(runtime: dict) -> dict:
    """The two fields _check_ssh_files reads, from a TrainingRuntime."""
    (node,) = [
        j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"
    ]
    return {
        "spec": {
            "sshAuthMountPath": runtime["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"],
            "mpiReplicaSpecs": {"Worker": {"template": node["template"]["spec"]["template"]}},
        }
    }


@pytest.mark.parametrize("mount,mode", [("/home/mpiuser/.ssh", None), ("/root/.ssh", 0o600)])
def test_harness_pods_are_the_controllers(mount, mode):
    """The pod specs the harness runs, against the controller's source (names of volumes and
    objects, items, modes, appended env), from the chart's rendered MPIJob: the names a
    container cannot show (volume names, defaultMode) are checked here."""
    helm = find_or_install_helm()
    values = chart_values("localhost/finetune-job:cpu-test")
    values["sshAuthMountPath"] = mount
    mpijob = one(render(helm, values, release=RELEASE, namespace=NAMESPACE), "MPIJob")
    job = mpijob["metadata"]["name"]
    workers, launcher = controller_pods(mpijob)
    ssh = {
        "name": "ssh-auth",
        "secret": {
            "secretName": f"{job}-ssh",
            "items": [
                {"key": "ssh-privatekey", "path": "id_rsa"},
                {"key": "ssh-publickey", "path": "id_rsa.pub"},
                {"key": "ssh-publickey", "path": "authorized_keys"},
            ],
        },
    }
    if mode is not None:
        ssh["secret"]["defaultMode"] = mode
    rendered = mpijob["spec"]["mpiReplicaSpecs"]
    for i, pod in enumerate(workers):
        assert (pod.name, pod.hostname, pod.subdomain) == (f"{job}-worker-{i}",) * 2 + (job,)
        template = rendered["Worker"]["template"]["spec"]
        assert pod.spec["volumes"] == [*template["volumes"], ssh]
        assert pod.container["volumeMounts"] == [
            *template["containers"][0]["volumeMounts"],
            {"name": "ssh-auth", "mountPath": mount},
        ]
        assert pod.container["env"] == [
            *template["containers"][0]["env"],
            {"name": "K_MPI_JOB_ROLE", "value": "worker"},
        ]
        assert pod.container["command"] == template["containers"][0]["command"]
        assert pod.restart_policy == rendered["Worker"]["restartPolicy"]
    template = rendered["Launcher"]["template"]["spec"]
    assert (launcher.hostname, launcher.subdomain) == (f"{job}-launcher", job)
    assert launcher.spec["volumes"] == [
        *template["volumes"],
        ssh,
        {
            "name": "mpi-job-config",
            "configMap": {
                "name": f"{job}-config",
                "items": [
                    {"key": "hostfile", "path": "hostfile", "mode": 0o444},
                    {"key": "discover_hosts.sh", "path": "discover_hosts.sh", "mode": 0o555},
                ],
            },
        },
    ]
    assert launcher.container["volumeMounts"][-2:] == [
        {"name": "ssh-auth", "mountPath": mount},
        {"name": "mpi-job-config", "mountPath": "/etc/mpi"},
    ]
    assert launcher.container["env"] == [
        *template["containers"][0]["env"],
        {"name": "K_MPI_JOB_ROLE", "value": "launcher"},
        {"name": "OMPI_MCA_orte_keep_fqdn_hostnames", "value": "true"},
        {"name": "OMPI_MCA_orte_default_hostfile", "value": "/etc/mpi/hostfile"},
        {"name": "OMPI_MCA_plm_rsh_args", "value": "-o ConnectionAttempts=10"},
        {"name": "OMPI_MCA_orte_set_default_slots", "value": str(mpijob["spec"]["slotsPerWorker"])},
        {"name": "NVIDIA_VISIBLE_DEVICES", "value": ""},
        {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": ""},
    ]
    assert hostfile_text(job, NAMESPACE, 2, 4) == (
        f"{job}-worker-0.{job}.ml.svc slots=4\n{job}-worker-1.{job}.ml.svc slots=4\n"
    )
    assert discover_hosts_text(job, NAMESPACE, [f"{job}-worker-1", f"{job}-worker-0"]) == (
        f"#!/bin/sh\necho {job}-worker-0.{job}.ml.svc\necho {job}-worker-1.{job}.ml.svc\n"
    )
    keys = ssh_auth_secret()
    assert keys["ssh-privatekey"].startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert keys["ssh-publickey"].startswith(b"ecdsa-sha2-nistp521 ")
    assert keys["ssh-publickey"].endswith(b"\n")


def test_harness_trainer_pods_are_trainers():
    """Trainer's MPI plugin: Secret `<trainjob>-mpi-ssh-auth` (volume mpi-ssh-auth) in every
    `node` container, ConfigMap `<trainjob>-mpi-hostfile` (volume mpi-hostfile, hostfile 0444)
    and the OpenMPI variables on the launcher's, JobSet pod names."""
    helm = find_or_install_helm()
    values = chart_values("localhost/finetune-job:cpu-test")
    values["launch"] = {"kind": "TrainJob"}
    values["slotsPerWorker"] = 1
    docs = render(helm, values, release=RELEASE, namespace=NAMESPACE)
    runtime, trainjob = one(docs, "TrainingRuntime"), one(docs, "TrainJob")
    name = trainjob["metadata"]["name"]
    nodes, launcher = trainer_pods(runtime, trainjob)
    assert [(p.hostname, p.fqdn) for p in nodes] == [
        (f"{name}-node-0-{i}", f"{name}-node-0-{i}.{name}") for i in range(2)
    ]
    assert launcher.hostname == f"{name}-launcher-0-0"
    for pod in [*nodes, launcher]:
        assert pod.spec["volumes"][-2 if pod is launcher else -1] == {
            "name": "mpi-ssh-auth",
            "secret": {
                "secretName": f"{name}-mpi-ssh-auth",
                "items": [
                    {"key": "ssh-privatekey", "path": "id_rsa"},
                    {"key": "ssh-publickey", "path": "id_rsa.pub"},
                    {"key": "ssh-publickey", "path": "authorized_keys"},
                ],
            },
        }
    assert launcher.spec["volumes"][-1] == {
        "name": "mpi-hostfile",
        "configMap": {
            "name": f"{name}-mpi-hostfile",
            "items": [{"key": "hostfile", "path": "hostfile", "mode": 0o444}],
        },
    }
    assert launcher.container["volumeMounts"][-2:] == [
        {"name": "mpi-ssh-auth", "mountPath": "/home/mpiuser/.ssh"},
        {"name": "mpi-hostfile", "mountPath": "/etc/mpi"},
    ]
    assert launcher.container["env"][-4:] == [
        {"name": "OMPI_MCA_orte_default_hostfile", "value": "/etc/mpi/hostfile"},
        {"name": "OMPI_MCA_orte_keep_fqdn_hostnames", "value": "true"},
        {"name": "OMPI_MCA_orte_set_default_slots", "value": "1"},
        {"name": "OMPI_MCA_plm_rsh_args", "value": "-o ConnectionAttempts=10"},
    ]
    assert trainer_hostfile_text(name, 2, 4) == (
        f"{name}-node-0-0.{name} slots=4\n{name}-node-0-1.{name} slots=4\n"
    )
