"""MPIJobClient over HTTP against the fake API server, through the real kubernetes client."""

from __future__ import annotations

import time

import pytest
from chart_runs import new_run
from fake_apiserver import (
    created,
    launcher_pod,
    running,
    started,
    succeeded,
    unschedulable,
    waiting,
    warning,
)

from deploy import constants as c
from deploy.client import MPIJobClient
from deploy.errors import (
    BadInputError,
    JobFailedError,
    JobStuckError,
    JobTimeoutError,
    NotFoundError,
    PermissionDeniedError,
)
from deploy.stuck import StuckBounds

NS = "team-a"


def test_namespace_comes_from_the_kubeconfig_context(client):
    assert client.namespace == NS


def test_bad_kubeconfig_is_bad_input(tmp_path):
    (tmp_path / "kc").write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(BadInputError, match="no usable Kubernetes config in .*kc"):
        MPIJobClient(kubeconfig=str(tmp_path / "kc"))


def test_logs_of_a_job_without_launcher(api, client):
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(NotFoundError, match=f"MPIJob {NS}/{run.name} has no launcher pod"):
        client.logs(run.name)


def test_config_map_denied_rolls_the_job_back(api, client):
    api.forbid("create", "configmaps")
    run = new_run()
    with pytest.raises(PermissionDeniedError, match=f"cannot create configmaps {NS}/{run.name}"):
        client.submit(run.job, run.config_map)
    assert not api.objects  # no MPIJob left waiting forever for its ConfigMap


def test_follow_streams_the_launcher_log(api, client):
    api.script([(0.05, running("line 1\nline 2\n")), (0.2, succeeded())])
    run = new_run()
    client.submit(run.job, run.config_map)
    lines = client.logs(run.name, follow=True, timeout=5)
    assert next(lines) == "line 1"  # an iterator: each line as it is written
    assert list(lines) == ["line 2"]
    assert client.wait(run.name, timeout=5).succeeded


def test_list_only_this_charts_jobs(api, client):
    a, b = new_run("aaa"), new_run("bbb")
    client.submit(a.job, a.config_map)
    client.submit(b.job, b.config_map)
    api.create("mpijobs", NS, {"metadata": {"name": "other", "labels": {"app": "x"}}})
    assert [s.name for s in client.list_jobs()] == sorted([a.name, b.name])


def test_unreachable_server_is_an_api_error(tmp_path):
    from fake_apiserver import kubeconfig

    from deploy.errors import ApiError

    (tmp_path / "kc").write_text(kubeconfig("http://127.0.0.1:9"))
    client = MPIJobClient(kubeconfig=str(tmp_path / "kc"), request_timeout=2)
    client.api_client.configuration.retries = False
    with pytest.raises(ApiError, match="cannot reach the API server at http://127.0.0.1:9"):
        client.status("r1")


# ---- runs that cannot start ------------------------------------------------------------------
SA_MISSING = (
    'Error creating: pods "{name}-launcher-" is forbidden: error looking up service account '
    '{ns}/finetune-job: serviceaccount "finetune-job" not found'
)
STUCK = {
    "image-pull-backoff": (
        [
            (0.05, waiting("ErrImagePull", "manifest unknown")),
            (0.1, waiting("ImagePullBackOff", 'Back-off pulling image "x"')),
        ],
        "pod {name}-launcher-x1 container launcher: ImagePullBackOff",
        'Back-off pulling image "x"',
    ),
    "missing-secret": (
        [
            (
                0.05,
                waiting(
                    "CreateContainerConfigError", 'secret "finetune-s3" not found', role="worker"
                ),
            )
        ],
        "pod {name}-worker-0 container worker: CreateContainerConfigError",
        'secret "finetune-s3" not found',
    ),
    "missing-service-account": (
        [(0.05, warning("Job", "FailedCreate", SA_MISSING, suffix="-launcher"))],
        "Job {name}-launcher: FailedCreate",
        'serviceaccount "finetune-job" not found',
    ),
    "worker-not-created": (
        [(0.05, warning("MPIJob", "MPIJobFailed", "worker pod created failed: forbidden"))],
        "MPIJob {name}: MPIJobFailed",
        "worker pod created failed: forbidden",
    ),
    "missing-configmap-volume": (
        [
            (0.05, waiting("ContainerCreating")),
            (
                0.1,
                warning(
                    "Pod",
                    "FailedMount",
                    'configmap "{name}-training" not found',
                    suffix="-launcher-x1",
                ),
            ),
        ],
        "pod {name}-launcher-x1: FailedMount",
        'configmap "{name}-training" not found',
    ),
    "unschedulable": (
        [(0.05, unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."))],
        "pod {name}-worker-0: Unschedulable",
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    ),
}


def bounds_for(case: str) -> StuckBounds:
    """Short for the case's own kind of problem, long for the other: the right bound applies."""
    if case == "unschedulable":
        return StuckBounds(start=600, unschedulable=0.5)
    return StuckBounds(start=0.5, unschedulable=600)


@pytest.mark.parametrize("case", list(STUCK))
def test_a_run_that_cannot_start_fails_naming_pod_container_and_reason(api, client, case):
    steps, subject, detail = STUCK[case]
    api.script([(0.0, created()), *steps])
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(JobStuckError) as info:
        client.wait(run.name, timeout=60, stuck=bounds_for(case))
    err = info.value
    subject, detail = subject.format(name=run.name), detail.format(name=run.name)
    assert str(err).startswith(f"MPIJob {NS}/{run.name} cannot start: {subject} for over 0.5 s")
    assert detail in str(err) and "\n" not in str(err)
    assert (err.namespace, err.name, err.reason) == (NS, run.name, subject.split(": ")[-1])
    assert err.subject == subject.split(": ")[0]
    assert isinstance(err, JobFailedError) and err.exit_code == JobFailedError.exit_code
    assert client.status(run.name).phase == c.CREATED  # left as it is: no condition says why


def test_a_pod_that_recovers_within_the_bound_does_not_fail_the_run(api, client):
    api.script(
        [
            (0.05, waiting("ErrImagePull", "registry timeout")),
            (0.15, started()),
            (0.2, running()),
            (0.3, succeeded()),
        ]
    )
    run = new_run()
    client.submit(run.job, run.config_map)
    assert client.wait(run.name, timeout=30, stuck=StuckBounds(start=20)).succeeded


def test_bounds_of_zero_wait_without_watching_pods(api, client):
    api.script([(0.05, waiting("ImagePullBackOff")), (0.2, running()), (0.3, succeeded())])
    run = new_run()
    client.submit(run.job, run.config_map)
    assert client.wait(run.name, timeout=30, stuck=StuckBounds(0, 0)).succeeded
    watched = {p.rsplit("/", 1)[-1] for m, p, q in api.requests if q.get("watch") == "true"}
    assert watched == {"mpijobs"}


def test_without_rights_on_events_pods_are_still_checked(api, client, caplog):
    api.forbid("list", "events")
    api.script([(0.05, waiting("ImagePullBackOff", "back-off"))])
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(JobStuckError, match="ImagePullBackOff"):
        client.wait(run.name, timeout=60, stuck=StuckBounds(start=0.5))
    assert "permission denied: cannot watch events" in caplog.text


def test_following_the_log_of_a_run_that_cannot_start(api, client):
    api.script([(0.05, waiting("ImagePullBackOff", "back-off"))])
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(JobStuckError, match=f"{run.name}-launcher-x1 container launcher"):
        client.logs(run.name, follow=True, timeout=60, stuck=StuckBounds(start=0.5))


def test_errors_are_the_builtins_a_caller_catches(api, client):
    api.script([(0.05, running())])
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(TimeoutError, match=f"{NS}/{run.name}") as info:
        client.wait(run.name, timeout=0.3)
    assert isinstance(info.value, JobTimeoutError)
    with pytest.raises(LookupError, match=f"{NS}/nope"):
        client.status("nope")
    assert issubclass(JobFailedError, RuntimeError)


# ---- logs --------------------------------------------------------------------------------------
def test_logs_of_every_launcher_attempt_and_the_previous_container(api, client):
    api.script(
        [
            (0.0, launcher_pod("a1", "attempt 1\nTraceback\n", phase="Failed")),
            (0.0, launcher_pod("b2", "attempt 2\nno line end", previous_logs="restarted\n")),
        ]
    )
    run = new_run()
    client.submit(run.job, run.config_map)
    deadline = time.monotonic() + 10
    while len(client.launcher_pods(run.name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pods = client.launcher_pod_names(run.name)
    assert pods == [f"{run.name}-launcher-a1", f"{run.name}-launcher-b2"]
    assert list(client.logs(run.name)) == ["attempt 2", "no line end"]  # the newest pod
    assert list(client.logs(run.name, pod=pods[0])) == ["attempt 1", "Traceback"]
    assert list(client.logs(run.name, pod=pods[0], tail_lines=1)) == ["Traceback"]
    assert list(client.logs(run.name, previous=True)) == ["restarted"]
    with pytest.raises(NotFoundError, match=f"{NS}/{pods[0]} of MPIJob {run.name} has no previous"):
        client.logs(run.name, pod=pods[0], previous=True)
    with pytest.raises(NotFoundError, match=f"MPIJob {NS}/{run.name} has no launcher pod nope"):
        client.logs(run.name, pod="nope")
    assert client.launcher_log_text(run.name) == (
        f"===== launcher pod {pods[0]} (attempt 1 of 2) =====\nattempt 1\nTraceback\n"
        f"===== launcher pod {pods[1]} (attempt 2 of 2) =====\nattempt 2\nno line end\n"
    )


def test_a_pod_watch_that_expires_is_relisted_and_no_watch_outlives_the_wait(api, client):
    import threading

    api.expire_next_watches(1, resource="pods")
    api.script([(0.05, waiting("ImagePullBackOff", "back-off"))])
    run = new_run()
    client.submit(run.job, run.config_map)
    with pytest.raises(JobStuckError, match="ImagePullBackOff"):
        client.wait(run.name, timeout=60, stuck=StuckBounds(start=0.5))
    pod_lists = [q for m, p, q in api.requests if p.endswith("/pods") and q.get("watch") != "true"]
    assert len(pod_lists) >= 2  # the first list, and the relist after 410 Gone
    assert not [t for t in threading.enumerate() if t.name.startswith("watch-")]


def test_following_goes_on_with_the_next_launcher_attempt(api, client):
    # The first attempt's log ends (its pod failed); the launcher Job starts a second pod.
    api.script(
        [
            (0.0, launcher_pod("a1", "try 1\n")),
            (0.05, lambda a, ns, name: a.set_condition(ns, name, "Running", "MPIJobRunning")),
            (2.0, launcher_pod("b2", "try 2\n")),
            (2.5, succeeded()),
        ]
    )
    run = new_run()
    client.submit(run.job, run.config_map)
    assert list(client.logs(run.name, follow=True, timeout=60)) == [
        "try 1",
        f"===== launcher pod {run.name}-launcher-b2 (attempt 2) =====",
        "try 2",
    ]
