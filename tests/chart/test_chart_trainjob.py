"""launch.kind: TrainJob: Kubeflow Trainer v2's TrainingRuntime (mlPolicy.mpi, a JobSet of a
"launcher" and a "node" replicated job) and the TrainJob that references it, built from the
same values as the MPIJob."""

from __future__ import annotations

import copy

import pytest
from chart_tools import (
    HelmError,
    by_kind,
    lint,
    one,
    render,
    replica_pod,
    replicated_job_pod,
    validate_trainer,
)

DATA, OUTPUT = "s3://datasets/flowers", "s3://runs/flowers"
REQUESTS = {"requests": {"cpu": "2", "memory": "4Gi"}}


def values(**top):
    return {"training": {"data": DATA, "output": OUTPUT}, "launch": {"kind": "TrainJob"}, **top}


def test_trainjob_and_its_runtime_replace_the_mpijob(helm):
    docs = render(helm, values(workers={"replicas": 3}, slotsPerWorker=2))
    assert not by_kind(docs, "MPIJob")
    trainjob, runtime = one(docs, "TrainJob"), one(docs, "TrainingRuntime")
    assert trainjob["metadata"]["name"] == runtime["metadata"]["name"] == "ft-finetune-job"
    assert trainjob["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": "ft-finetune-job",
    }
    assert trainjob["spec"]["trainer"] == {"numNodes": 3, "numProcPerNode": 2}
    assert runtime["spec"]["mlPolicy"] == {
        "numNodes": 3,
        "mpi": {
            "numProcPerNode": 2,
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": "/home/mpiuser/.ssh",
            "runLauncherAsNode": False,
        },
    }
    jobset = runtime["spec"]["template"]["spec"]
    assert [j["name"] for j in jobset["replicatedJobs"]] == ["launcher", "node"]
    assert jobset["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["launcher"]}
    assert jobset["failurePolicy"] == {"maxRestarts": 3}
    validate_trainer(trainjob)
    validate_trainer(runtime)


def test_trainer_mounts_keys_and_hostfile_only_into_containers_named_node(helm):
    runtime = one(render(helm, values()), "TrainingRuntime")
    for name in ("launcher", "node"):
        (container,) = replicated_job_pod(runtime, name)["spec"]["containers"]
        assert container["name"] == "node"


def test_pods_are_the_mpijobs_pods(helm):
    """Same image, command, env, security, volumes and resources as the MPIJob's launcher and
    workers; only the container name and the Job's restartPolicy differ."""
    common = {
        "workers": {"replicas": 2, "resources": REQUESTS},
        "env": [{"name": "A", "value": "1"}],
    }
    trainer_docs = render(helm, values(**copy.deepcopy(common)))
    mpi_values = values(**copy.deepcopy(common))
    mpi_values["launch"] = {"kind": "MPIJob"}
    mpijob = one(render(helm, mpi_values), "MPIJob")
    runtime = one(trainer_docs, "TrainingRuntime")
    for job, role, policy in (
        ("launcher", "Launcher", "OnFailure"),
        ("node", "Worker", "OnFailure"),
    ):
        pod = copy.deepcopy(replicated_job_pod(runtime, job))
        assert pod["spec"].pop("restartPolicy") == policy
        pod["spec"]["containers"][0]["name"] = role.lower()
        assert pod == replica_pod(mpijob, role)


@pytest.mark.parametrize(
    "creation,depends",
    [("WaitForWorkersReady", [{"name": "node", "status": "Ready"}]), ("AtStartup", None)],
)
def test_launcher_waits_for_ready_nodes_like_wait_for_workers_ready(helm, creation, depends):
    runtime = one(render(helm, values(launcherCreationPolicy=creation)), "TrainingRuntime")
    (launcher,) = [
        j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "launcher"
    ]
    assert launcher.get("dependsOn") == depends
    assert launcher["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }


def test_kueue_labels_go_on_the_trainjob(helm):
    vals = values(
        kueue={"queueName": "team-vision", "priorityClass": "batch-low"},
        workers={"replicas": 2, "resources": REQUESTS},
    )
    docs = render(helm, vals)
    labels = one(docs, "TrainJob")["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-vision"
    assert labels["kueue.x-k8s.io/priority-class"] == "batch-low"
    assert "kueue.x-k8s.io/queue-name" not in one(docs, "TrainingRuntime")["metadata"]["labels"]


def test_gang_scheduling_becomes_the_runtimes_pod_group_policy(helm):
    policy = {"enabled": True, "scheduleTimeoutSeconds": 300}
    runtime = one(render(helm, values(runPolicy={"schedulingPolicy": policy})), "TrainingRuntime")
    assert runtime["spec"]["podGroupPolicy"] == {"coscheduling": {"scheduleTimeoutSeconds": 300}}
    validate_trainer(runtime)
    runtime = one(render(helm, values()), "TrainingRuntime")
    assert "podGroupPolicy" not in runtime["spec"]
    assert "schedulerName" not in str(runtime)


def test_run_policy_maps_to_the_jobset_and_the_trainjob(helm):
    run_policy = {"backoffLimit": 1, "ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 7200}
    docs = render(helm, values(runPolicy=run_policy))
    jobset = one(docs, "TrainingRuntime")["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {"maxRestarts": 1}
    assert jobset["ttlSecondsAfterFinished"] == 60
    assert one(docs, "TrainJob")["spec"]["activeDeadlineSeconds"] == 7200


def test_a_schedule_needs_the_mpijob_kind(helm):
    vals = values(schedule="0 3 * * 0")
    with pytest.raises(HelmError, match=r"schedule"):
        render(helm, vals)
    with pytest.raises(HelmError, match=r"schedule"):
        lint(helm, vals)


def test_unknown_kind_is_refused(helm):
    with pytest.raises(HelmError, match=r"launch/kind"):
        render(helm, values(launch={"kind": "PyTorchJob"}))


def test_validation_rejects_misspelt_trainer_fields(helm):
    docs = render(helm, values())
    runtime = one(docs, "TrainingRuntime")
    runtime["spec"]["mlPolicy"]["mpi"]["numProcsPerNode"] = 2
    with pytest.raises(AssertionError, match="numProcsPerNode"):
        validate_trainer(runtime)
    trainjob = one(docs, "TrainJob")
    trainjob["spec"]["trainer"]["nodes"] = 2
    with pytest.raises(AssertionError, match="nodes"):
        validate_trainer(trainjob)


def test_the_runtime_is_installed_without_a_run_for_submits_runs(helm):
    """runOnInstall=false: no TrainJob, but the TrainingRuntime that submit's runs reference."""
    docs = render(helm, values(runOnInstall=False))
    assert not by_kind(docs, "TrainJob")
    validate_trainer(one(docs, "TrainingRuntime"))
