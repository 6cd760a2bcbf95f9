"""The chart's TrainJob run the way Kubeflow Trainer v2's MPI plugin lays it out (see
operator_emulation.py): node and launcher containers of the CPU image, Trainer's ssh Secret,
hostfile and OpenMPI variables, JobSet's pod names.

No Trainer controller runs here (operator_emulation.py says why). The MPIJob path needs no
emulation: tests/cluster/test_real_node.py runs the real MPI Operator's pods on a real node.
"""

from __future__ import annotations

import pytest
from chart_tools import by_kind, find_or_install_helm, one, render
from operator_emulation import (
    Cluster,
    ssh_auth_secret,
    trainer_hostfile_text,
    trainer_pods,
)

NAMESPACE, RELEASE = "ml", "emu"
S3_NAME, S3_PORT = "moto.storage.svc", 5000
PUSHGATEWAY_NAME, PUSHGATEWAY_PORT = "pushgateway.monitoring.svc", 9091
CREDENTIALS = {"AWS_ACCESS_KEY_ID": b"emulated", "AWS_SECRET_ACCESS_KEY": b"emulated"}


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
            "epochs": 2,
            "lr": 0.002,
            "log_interval": 1,
            "pushgateway": f"http://{PUSHGATEWAY_NAME}:{PUSHGATEWAY_PORT}",
        },
    }


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
