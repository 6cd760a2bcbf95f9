"""What MPIJob conditions mean."""

from __future__ import annotations

import pytest

from deploy import constants as c
from deploy.status import job_state
from deploy.stuck import START, UNSCHEDULABLE, StuckBounds, StuckTracker, pod_problems


def job(*conds: tuple[str, str]) -> dict:
    return {
        "metadata": {
            "name": "r1",
            "namespace": "ml",
            "labels": {c.RUN_LABEL: "r1", c.SCHEDULE_LABEL: "nightly"},
            "annotations": {c.OUTPUT_ANNOTATION: "s3://b/out/runs/r1"},
        },
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": f"{t}Reason", "message": f"{t} message"}
                for t, s in conds
            ]
        },
    }


@pytest.mark.parametrize(
    ("conds", "phase", "finished"),
    [
        ((), c.PENDING, False),
        ((("Created", "True"),), c.CREATED, False),
        ((("Created", "True"), ("Running", "True")), c.RUNNING, False),
        ((("Created", "True"), ("Running", "False"), ("Restarting", "True")), c.RESTARTING, False),
        ((("Created", "True"), ("Running", "False"), ("Succeeded", "True")), c.SUCCEEDED, True),
        ((("Created", "True"), ("Running", "True"), ("Failed", "True")), c.FAILED, True),
        ((("Succeeded", "False"), ("Running", "True")), c.RUNNING, False),
        ((("Created", "True"), ("Suspended", "True")), c.SUSPENDED, False),
    ],
    ids=[
        "no-conditions",
        "created",
        "running",
        "restarting",
        "succeeded",
        "failed-wins-over-running",
        "false-is-ignored",
        "suspended",
    ],
)
def test_phase_from_conditions(conds, phase, finished):
    state = job_state(job(*conds))
    assert state.phase == phase
    assert state.finished is finished
    if conds and phase != c.PENDING:
        assert state.reason == f"{phase}Reason"


def test_state_carries_run_schedule_output_and_names_itself():
    state = job_state(job(("Failed", "True")))
    assert (state.run, state.schedule, state.output) == ("r1", "nightly", "s3://b/out/runs/r1")
    assert state.describe() == "ml/r1 Failed (FailedReason: Failed message)"
    assert state.to_dict()["conditions"][0]["type"] == "Failed"


# ---- pods that cannot start ------------------------------------------------------------------
def pod(name="r1-launcher-x1", role="launcher", created="2026-01-01T00:00:10Z", **status):
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {c.OPERATOR_JOB_NAME_LABEL: "r1", c.OPERATOR_JOB_ROLE_LABEL: role},
        },
        "status": {"phase": "Pending", **status},
    }


def waiting(container, reason, message="", init=False):
    key = "initContainerStatuses" if init else "containerStatuses"
    return {
        key: [{"name": container, "state": {"waiting": {"reason": reason, "message": message}}}]
    }


def running(container):
    return {"containerStatuses": [{"name": container, "state": {"running": {}}}]}


def unschedulable(message):
    return {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ]
    }


def event(kind, name, reason, message="m", type_="Warning", when="2026-01-01T00:00:05Z"):
    return {
        "involvedObject": {"kind": kind, "name": name},
        "reason": reason,
        "message": message,
        "type": type_,
        "lastTimestamp": when,
    }


@pytest.mark.parametrize(
    ("status", "subject", "reason", "kind"),
    [
        (
            waiting("launcher", "ImagePullBackOff", 'Back-off pulling image "x"'),
            "container",
            "ImagePullBackOff",
            START,
        ),
        (waiting("launcher", "ErrImagePull", "not found"), "container", "ErrImagePull", START),
        (
            waiting("launcher", "InvalidImageName", "bad ref"),
            "container",
            "InvalidImageName",
            START,
        ),
        (
            waiting("launcher", "CreateContainerConfigError", 'secret "s3" not found'),
            "container",
            "CreateContainerConfigError",
            START,
        ),
        (waiting("init", "ErrImagePull", "denied", init=True), "container", "ErrImagePull", START),
        (
            unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            "pod",
            "Unschedulable",
            UNSCHEDULABLE,
        ),
    ],
    ids=[
        "image-backoff",
        "err-image-pull",
        "invalid-image",
        "config-error",
        "init-container",
        "unschedulable",
    ],
)
def test_pod_problems_name_pod_container_and_reason(status, subject, reason, kind):
    (problem,) = pod_problems(pod(**status))
    assert (problem.reason, problem.kind, problem.pod) == (reason, kind, "r1-launcher-x1")
    assert problem.subject.startswith("pod r1-launcher-x1")
    if subject == "container":
        assert problem.container and problem.subject.endswith(f"container {problem.container}")
    assert problem.message


@pytest.mark.parametrize(
    "status",
    [
        {},
        waiting("launcher", "ContainerCreating"),
        running("launcher"),
        {"conditions": [{"type": "PodScheduled", "status": "True"}]},
    ],
    ids=["new", "container-creating", "running", "scheduled"],
)
def test_pods_on_their_way_have_no_problem(status):
    assert pod_problems(pod(**status)) == []


def test_messages_become_one_line():
    (problem,) = pod_problems(pod(**waiting("launcher", "ErrImagePull", "rpc error:\n  denied\n")))
    assert problem.message == "rpc error: denied"
    assert problem.describe(300) == (
        "pod r1-launcher-x1 container launcher: ErrImagePull for over 300 s: rpc error: denied"
    )


def tracker(start=300.0, unsched=1800.0):
    return StuckTracker("r1", StuckBounds(start=start, unschedulable=unsched))


def test_a_problem_is_overdue_only_after_its_bound():
    t = tracker()
    t.pod("ADDED", pod(**waiting("launcher", "ImagePullBackOff")), now=100.0)
    assert t.next_due() == 400.0
    assert t.overdue(399.0) is None
    assert t.overdue(400.0).reason == "ImagePullBackOff"


def test_image_pull_reasons_flipping_keep_their_clock_and_the_pull_error():
    t = tracker()
    t.pod("ADDED", pod(**waiting("launcher", "ErrImagePull", "denied")), now=0.0)
    t.pod("MODIFIED", pod(**waiting("launcher", "ImagePullBackOff", "back-off")), now=200.0)
    problem = t.overdue(300.0)
    assert problem is not None and problem.reason == "ImagePullBackOff"
    assert problem.message == "back-off; last pull error: denied"


def test_a_pod_that_recovers_or_goes_away_is_forgotten():
    t = tracker()
    t.pod("ADDED", pod(**waiting("launcher", "ImagePullBackOff")), now=0.0)
    t.pod("MODIFIED", pod(**running("launcher")), now=10.0)
    assert t.next_due() is None
    t.pod("MODIFIED", pod(name="r1-worker-0", **waiting("worker", "ErrImagePull")), now=20.0)
    t.relist_pods([pod()], now=30.0)  # the worker is gone from a fresh list
    assert t.next_due() is None


def test_unschedulable_has_its_own_bound_and_zero_turns_a_bound_off():
    t = tracker(start=300.0, unsched=1800.0)
    t.pod("ADDED", pod(**unschedulable("no nodes")), now=0.0)
    assert t.overdue(1000.0) is None and t.overdue(1800.0) is not None
    t = tracker(start=300.0, unsched=0)
    t.pod("ADDED", pod(**unschedulable("no nodes")), now=0.0)
    assert t.next_due() is None and t.overdue(1e9) is None


def test_launcher_job_failed_create_until_a_launcher_pod_is_created():
    t = tracker()
    sa = 'Error creating: pods "r1-launcher-" is forbidden: serviceaccount "sa" not found'
    t.event(event("Job", "r1-launcher", "FailedCreate", sa), now=0.0)
    problem = t.overdue(300.0)
    assert problem is not None and problem.subject == "Job r1-launcher" and sa in problem.message
    t.pod("ADDED", pod(created="2026-01-01T00:00:06Z"), now=10.0)  # created after the event
    assert t.next_due() is None


def test_an_old_failed_create_is_ignored_once_a_pod_was_created_after_it():
    t = tracker()
    t.pod("ADDED", pod(created="2026-01-01T00:00:10Z"), now=0.0)
    t.event(event("Job", "r1-launcher", "FailedCreate", when="2026-01-01T00:00:05Z"), now=1.0)
    assert t.next_due() is None


def test_operator_event_about_worker_creation():
    t = tracker()
    t.event(event(c.KIND, "r1", "MPIJobFailed", "worker pod created failed: forbidden"), now=0.0)
    assert t.overdue(300.0).subject == "MPIJob r1"
    t.pod("ADDED", pod(name="r1-worker-0", role="worker"), now=1.0)
    assert t.next_due() is None


def test_failed_mount_until_the_pod_starts():
    t = tracker()
    t.pod("ADDED", pod(**waiting("launcher", "ContainerCreating")), now=0.0)
    msg = 'MountVolume.SetUp failed for volume "cfg" : configmap "r1-training" not found'
    t.event(event("Pod", "r1-launcher-x1", "FailedMount", msg), now=1.0)
    assert t.overdue(301.0).reason == "FailedMount"
    t.pod("MODIFIED", pod(**running("launcher")), now=2.0)
    assert t.next_due() is None
    t.event(event("Pod", "r1-launcher-x1", "FailedMount", msg), now=3.0)  # an old one, replayed
    assert t.next_due() is None


@pytest.mark.parametrize(
    "ev",
    [
        event("Job", "r1-launcher", "FailedCreate", type_="Normal"),
        event("Job", "r10-launcher", "FailedCreate"),
        event("Job", "other-launcher", "FailedCreate"),
        event("Pod", "other-launcher-x1", "FailedMount"),
        event(c.KIND, "r1", "MPIJobRunning"),
    ],
    ids=["normal", "similar-name", "other-run", "other-pod", "other-reason"],
)
def test_events_of_other_objects_are_ignored(ev):
    t = tracker()
    t.event(ev, now=0.0)
    assert t.next_due() is None
