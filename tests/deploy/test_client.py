"""MPIJobClient over HTTP against the fake API server, through the real kubernetes client."""

from __future__ import annotations

import io
import time

import pytest
from fake_apiserver import created, failed, running, succeeded

from deploy import constants as c
from deploy import manifest
from deploy.client import MPIJobClient
from deploy.errors import (
    AlreadyExistsError,
    BadInputError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    PermissionDeniedError,
)

NS = "team-a"


def new_run(name_prefix: str = "ft"):
    v = manifest.merge(
        manifest.DEFAULTS, {"training": {"synthetic": True, "output": "s3://b/flowers"}}
    )
    return manifest.build_run(v, manifest.Release.of(v, name="ft"), prefix=name_prefix)


def test_namespace_comes_from_the_kubeconfig_context(client):
    assert client.namespace == NS


def test_bad_kubeconfig_is_bad_input(tmp_path):
    (tmp_path / "kc").write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(BadInputError, match="no usable Kubernetes config in .*kc"):
        MPIJobClient(kubeconfig=str(tmp_path / "kc"))


def test_submit_wait_success_logs_and_delete(api, client):
    api.script([(0.05, created()), (0.1, running("epoch 1 val_top1 0.9\n")), (0.2, succeeded())])
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    seen = []
    state = client.wait(run.name, timeout=5, on_change=lambda s: seen.append(s.phase))
    assert state.succeeded and state.output == run.output
    assert seen[-1] == c.SUCCEEDED and c.RUNNING in seen
    assert client.logs(run.name) == "epoch 1 val_top1 0.9\n"
    # The ConfigMap is owned by the MPIJob: deleting the job collects it.
    cm = api.objects[("configmaps", NS, f"{run.name}-training")]
    (owner,) = cm["metadata"]["ownerReferences"]
    assert owner["kind"] == "MPIJob" and owner["name"] == run.name and owner["controller"]
    client.delete(run.name)
    assert not api.objects
    # Waiting is watch-based: no polling GETs of the job.
    assert not [p for m, p, _ in api.requests if m == "GET" and p.endswith(run.name)]


def test_failure_raises_with_reason(api, client):
    api.script([(0.05, running("Traceback ...\n")), (0.1, failed("launcher exited with 1"))])
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    with pytest.raises(
        JobFailedError,
        match=f"MPIJob {NS}/{run.name} Failed "
        r"\(BackoffLimitExceeded: launcher exited with 1\)",
    ):
        client.wait(run.name, timeout=5)
    assert client.status(run.name).failed
    assert client.logs(run.name) == "Traceback ...\n"


def test_timeout_names_the_job_and_leaves_it_running(api, client):
    api.script([(0.05, running())])
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    start = time.monotonic()
    with pytest.raises(
        JobTimeoutError, match=f"MPIJob {NS}/{run.name} did not finish within 0.6 s"
    ):
        client.wait(run.name, timeout=0.6)
    assert time.monotonic() - start < 60  # gave up (bounded); not a timing assertion
    assert client.status(run.name).phase == c.RUNNING


def test_watch_that_the_server_closes_is_resumed_from_the_last_version(api, client):
    api.max_watch_seconds = 0.15  # every watch "expires" quickly
    api.script([(0.05, running()), (0.6, succeeded())])
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    assert client.wait(run.name, timeout=5).succeeded
    watches = api.watch_requests()
    assert len(watches) >= 2  # at least one watch expired and was resumed
    versions = [int(w["resourceVersion"]) for w in watches]
    assert versions == sorted(versions) and all(w["resourceVersion"] for w in watches)


def test_watch_410_gone_relists_and_resumes(api, client):
    api.script([(0.05, running()), (0.3, succeeded())])
    api.expire_next_watches(1)
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    assert client.wait(run.name, timeout=5).succeeded
    lists = [
        q
        for m, p, q in api.requests
        if m == "GET" and p.endswith("/mpijobs") and q.get("watch") != "true"
    ]
    assert len(lists) >= 2  # the first list, and the relist after 410 Gone
    assert len(api.watch_requests()) >= 2


def test_deleted_while_waiting(api, client):
    api.script([(0.05, running()), (0.15, lambda a, ns, name: a._delete_for_test(ns, name))])
    api._delete_for_test = lambda ns, name: api.put(  # noqa: SLF001 - a test-only hook
        "mpijobs", ns, dict(api.objects[("mpijobs", ns, name)]), "DELETED"
    )
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    with pytest.raises(NotFoundError, match=f"MPIJob {NS}/{run.name} was deleted while waiting"):
        client.wait(run.name, timeout=5)


def test_already_exists(api, client):
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    with pytest.raises(
        AlreadyExistsError, match=f"mpijobs.kubeflow.org {NS}/{run.name} already exists"
    ) as info:
        client.submit(run.mpijob, run.config_map)
    assert info.value.exit_code == 3
    assert info.value.__cause__ is not None and info.value.__cause__.status == 409


@pytest.mark.parametrize("call", ["status", "wait", "logs", "delete"])
def test_not_found(client, call):
    args = {"wait": (1.0,)}.get(call, ())
    with pytest.raises(NotFoundError, match=f"{NS}/nope"):
        getattr(client, call)("nope", *args)


def test_logs_of_a_job_without_launcher(api, client):
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    with pytest.raises(NotFoundError, match=f"MPIJob {NS}/{run.name} has no launcher pod"):
        client.logs(run.name)


@pytest.mark.parametrize(
    ("verb", "resource", "call"),
    [
        ("create", "mpijobs", "submit"),
        ("watch", "mpijobs", "wait"),
        ("get", "pods/log", "logs"),
    ],
    ids=["create", "watch", "logs"],
)
def test_rbac_denied_is_a_clear_message(api, client, verb, resource, call):
    api.script([(0.0, running("x\n"))])
    run = new_run()
    if call != "submit":
        client.submit(run.mpijob, run.config_map)
        time.sleep(0.1)
    api.forbid(verb, resource)
    args = {"submit": (run.mpijob, run.config_map), "wait": (run.name, 2.0), "logs": (run.name,)}[
        call
    ]
    with pytest.raises(
        PermissionDeniedError,
        match=f"permission denied: cannot {verb} .*{NS}"
        f".*HTTP 403.*grant this identity '{verb}'"
        ".*cannot .* in the namespace",
    ) as info:
        getattr(client, call)(*args)
    assert info.value.__cause__.status == 403


def test_config_map_denied_rolls_the_job_back(api, client):
    api.forbid("create", "configmaps")
    run = new_run()
    with pytest.raises(PermissionDeniedError, match=f"cannot create configmaps {NS}/{run.name}"):
        client.submit(run.mpijob, run.config_map)
    assert not api.objects  # no MPIJob left waiting forever for its ConfigMap


def test_follow_streams_the_launcher_log(api, client):
    api.script([(0.05, running("line 1\nline 2\n")), (0.2, succeeded())])
    run = new_run()
    client.submit(run.mpijob, run.config_map)
    out = io.StringIO()
    client.follow_logs(run.name, out, time.monotonic() + 5)
    assert out.getvalue() == "line 1\nline 2\n"
    assert client.wait(run.name, timeout=5).succeeded


def test_list_only_this_charts_jobs(api, client):
    a, b = new_run("aaa"), new_run("bbb")
    client.submit(a.mpijob, a.config_map)
    client.submit(b.mpijob, b.config_map)
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
