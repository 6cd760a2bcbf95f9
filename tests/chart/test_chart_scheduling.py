"""What the MPI Operator accepts and how the job is scheduled: restart policies, run policy,
gang scheduling (runPolicy.schedulingPolicy), Kueue labels, no schedulerName."""

from __future__ import annotations

import re

import pytest
from chart_tools import CI_VALUES, HelmError, lint, one, render, replica_pod, validate_mpijob

DATA, OUTPUT = "s3://datasets/flowers", "s3://runs/flowers"
REQUESTS = {"requests": {"cpu": "2", "memory": "4Gi"}}


def values(**top):
    return {"training": {"data": DATA, "output": OUTPUT}, **top}


def _fails(helm, vals, message, schema=True):
    """`helm template` refuses the values, naming the problem; so does `helm lint --strict` when
    the schema catches it (helm's lint only logs a template's `fail`)."""
    with pytest.raises(HelmError) as err:
        render(helm, vals)
    assert re.search(message, err.value.stderr), err.value.stderr
    if not schema:
        return
    with pytest.raises(HelmError) as err:
        lint(helm, vals)
    assert re.search(message, err.value.stderr), err.value.stderr


# --- restart policies: the operator's validation allows Never and OnFailure only -------------


@pytest.mark.parametrize("role", ["launcher", "workers"])
@pytest.mark.parametrize("policy", ["Always", "ExitCode"])
def test_restart_policies_the_operator_rejects_are_refused(helm, role, policy):
    _fails(helm, values(**{role: {"restartPolicy": policy}}), rf"{role}/restartPolicy")


@pytest.mark.parametrize("policy", ["Never", "OnFailure"])
def test_restart_policies_the_operator_accepts_render(helm, policy):
    vals = values(launcher={"restartPolicy": policy}, workers={"replicas": 2})
    vals["workers"]["restartPolicy"] = policy
    spec = one(render(helm, vals), "MPIJob")["spec"]["mpiReplicaSpecs"]
    assert spec["Launcher"]["restartPolicy"] == spec["Worker"]["restartPolicy"] == policy


# --- run policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_clean_pod_policy_is_always_explicit_and_no_scheduler_name_is_rendered(helm, path):
    """The operator's code defaults cleanPodPolicy to None, its docs to Running: say which.
    schedulerName belongs to the operator (it sets its gang scheduler's)."""
    docs = render(helm, files=[path])
    for mpijob in [d for d in docs if d["kind"] == "MPIJob"]:
        assert mpijob["spec"]["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    assert "schedulerName" not in str(docs)


def test_clean_pod_policy_cannot_be_left_out(helm):
    _fails(helm, values(runPolicy={"cleanPodPolicy": None}), r"cleanPodPolicy")


# --- gang scheduling ---------------------------------------------------------------------------


def test_no_scheduling_policy_unless_enabled(helm):
    run_policy = one(render(helm, values()), "MPIJob")["spec"]["runPolicy"]
    assert "schedulingPolicy" not in run_policy


@pytest.mark.parametrize(
    "creation,replicas,expected",
    [("WaitForWorkersReady", 4, 4), ("WaitForWorkersReady", 1, 1), ("AtStartup", 4, 5)],
    ids=["wait-4", "wait-1", "atstartup-4"],
)
def test_min_available_defaults_to_the_pods_that_can_be_pending_together(
    helm, creation, replicas, expected
):
    """With WaitForWorkersReady the launcher only exists once every worker is Ready: a group of
    workers + 1 (the operator's default) would never be complete (mpi-operator#608)."""
    vals = values(
        launcherCreationPolicy=creation,
        workers={"replicas": replicas},
        runPolicy={"schedulingPolicy": {"enabled": True}},
    )
    mpijob = one(render(helm, vals), "MPIJob")
    assert mpijob["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": expected}
    validate_mpijob(mpijob)


def test_scheduling_policy_values_pass_through(helm):
    policy = {
        "enabled": True,
        "minAvailable": 2,
        "queue": "training",
        "priorityClass": "training-high",
        "minResources": {"cpu": 16, "nvidia.com/gpu": "8"},
        "scheduleTimeoutSeconds": 600,
    }
    vals = values(workers={"replicas": 3}, runPolicy={"schedulingPolicy": policy})
    mpijob = one(render(helm, vals), "MPIJob")
    assert mpijob["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 2,
        "queue": "training",
        "priorityClass": "training-high",
        "minResources": {"cpu": "16", "nvidia.com/gpu": "8"},
        "scheduleTimeoutSeconds": 600,
    }
    validate_mpijob(mpijob)


def test_min_available_above_the_workers_would_deadlock_and_fails(helm):
    policy = {"enabled": True, "minAvailable": 3}
    vals = values(workers={"replicas": 2}, runPolicy={"schedulingPolicy": policy})
    _fails(helm, vals, r"minAvailable \(3\) is more than workers.replicas \(2\)", schema=False)


def test_min_available_above_the_workers_is_fine_at_startup(helm):
    vals = values(
        launcherCreationPolicy="AtStartup",
        workers={"replicas": 2},
        runPolicy={"schedulingPolicy": {"enabled": True, "minAvailable": 3}},
    )
    assert one(render(helm, vals), "MPIJob")["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 3
    }


def test_unknown_scheduling_policy_key_is_refused(helm):
    _fails(
        helm,
        values(runPolicy={"schedulingPolicy": {"enabled": True, "minMember": 2}}),
        r"(?i)additional propert(y|ies) '?minMember'?",
    )


# --- Kueue ---------------------------------------------------------------------------------------


def test_kueue_labels_go_on_the_mpijob_only(helm):
    vals = values(
        kueue={"queueName": "team-vision", "priorityClass": "batch-low"},
        workers={"replicas": 2, "resources": REQUESTS},
    )
    mpijob = one(render(helm, vals), "MPIJob")
    labels = mpijob["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-vision"
    assert labels["kueue.x-k8s.io/priority-class"] == "batch-low"
    for role in ("Launcher", "Worker"):
        pod_labels = replica_pod(mpijob, role)["metadata"]["labels"]
        assert not any(k.startswith("kueue.") for k in pod_labels)
    validate_mpijob(mpijob)


def test_no_kueue_labels_without_a_queue(helm):
    labels = one(render(helm, values()), "MPIJob")["metadata"]["labels"]
    assert not any(k.startswith("kueue.") for k in labels)


def test_kueue_priority_without_a_queue_is_refused(helm):
    _fails(helm, values(kueue={"priorityClass": "batch-low"}), r"kueue/queueName")


def test_kueue_needs_worker_requests(helm):
    """Kueue's quota is counted in requests; a job without them would be admitted as free."""
    vals = values(kueue={"queueName": "team-vision"})
    _fails(helm, vals, r"workers(/resources)?.*requests")
    vals["workers"] = {"replicas": 2, "resources": {"limits": {"cpu": "4"}}}
    _fails(helm, vals, r"workers/resources.*requests")


def test_kueue_needs_launcher_requests(helm):
    vals = values(
        kueue={"queueName": "team-vision"},
        workers={"replicas": 2, "resources": REQUESTS},
        launcher={"resources": {"requests": None}},  # null drops the chart default
    )
    _fails(helm, vals, r"launcher/resources.*requests")


@pytest.mark.parametrize("name", ["Team_A", "-team"], ids=["upper-underscore", "leading-dash"])
def test_kueue_queue_name_must_be_a_label_value_kueue_accepts(helm, name):
    vals = values(kueue={"queueName": name}, workers={"replicas": 2, "resources": REQUESTS})
    _fails(helm, vals, r"kueue/queueName")
