"""The client with Kubeflow Trainer's TrainJob: conditions, the launcher pod by JobSet's labels,
a run's kind found by name, both kinds listed. Against the fake API server, with a TrainJob
that real helm rendered from the chart's trainjob scenario."""

from __future__ import annotations

import pytest
import yaml
from chart_runs import new_run
from chart_tools import CI_VALUES, MPIJOB_CRD, TRAINER_CRDS, render
from fake_apiserver import failed, running, succeeded, waiting

from deploy import constants as c
from deploy import kinds, manifest
from deploy.client import MPIJobClient
from deploy.errors import JobFailedError, JobStuckError, NotFoundError
from deploy.stuck import StuckBounds

NS = "team-a"
BASE = {"training": {"data": "s3://b/ds", "output": "s3://b/flowers"}}


@pytest.fixture(scope="module")
def rendered(helm) -> manifest.Rendered:
    path = next(p for p in CI_VALUES if "TrainJob" in p.read_text())
    docs = render(helm, BASE, files=[path], release="ft")
    return manifest.parse(yaml.safe_dump_all(docs), path.name)


def test_a_completed_trainjob_is_waited_for_and_its_launchers_log_read(api, client, rendered):
    api.script([(0.05, running("epoch 1 val_top1 0.9\n")), (0.1, succeeded())])
    run = manifest.build_run(rendered)
    client.submit(run.job, run.config_map)
    seen: list[str] = []
    state = client.wait(run.name, timeout=10, on_change=lambda s: seen.append(s.phase))
    assert state.succeeded and state.kind == "TrainJob" and state.output == run.output
    assert seen[-1] == c.SUCCEEDED  # Trainer's Complete
    # Trainer's JobSet labels name the launcher pod; the client reads its log.
    (pod,) = [o for (r, _, _), o in api.objects.items() if r == "pods"]
    labels = pod["metadata"]["labels"]
    assert labels[kinds.TRAINJOB.run_label] == run.name
    assert labels[kinds.TRAINJOB.role_label] == "launcher"
    assert list(client.logs(run.name)) == ["epoch 1 val_top1 0.9"]


def test_a_failed_trainjob_fails_the_wait(api, client, rendered):
    api.script([(0.05, failed("launcher exited 1"))])
    run = manifest.build_run(rendered)
    client.submit(run.job, run.config_map)
    with pytest.raises(JobFailedError, match=r"TrainJob team-a/.* Failed .*launcher exited 1"):
        client.wait(run.name, timeout=10)


def test_a_trainjob_whose_launcher_cannot_pull_its_image_is_stuck(api, client, rendered):
    api.script([(0.05, waiting("ImagePullBackOff", "Back-off pulling image"))])
    run = manifest.build_run(rendered)
    client.submit(run.job, run.config_map)
    with pytest.raises(JobStuckError, match=r"TrainJob team-a/\S+ cannot start: pod .*launcher"):
        client.wait(run.name, timeout=30, stuck=StuckBounds(start=0.5))


def test_following_a_trainjob_starts_once_its_launcher_pod_runs(api, client, rendered):
    """A TrainJob has no Running condition: the launcher pod running is the start."""
    api.script([(0.05, running("one\ntwo\n")), (0.3, succeeded())])
    run = manifest.build_run(rendered)
    client.submit(run.job, run.config_map)
    assert list(client.logs(run.name, follow=True, timeout=10)) == ["one", "two"]


def test_a_fresh_client_finds_the_kind_by_name_and_lists_both(api, kubeconfig_path, rendered):
    api.script([])
    submitter = MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5)
    trainjob = manifest.build_run(rendered)
    submitter.submit(trainjob.job, trainjob.config_map)
    mpijob = new_run()
    MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5).submit(
        mpijob.job, mpijob.config_map
    )
    fresh = MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5)
    assert fresh.status(trainjob.name).kind == "TrainJob"
    listed = MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5).list_jobs()
    assert {(s.name, s.kind) for s in listed} == {
        (trainjob.name, "TrainJob"),
        (mpijob.name, "MPIJob"),
    }
    MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5).delete(trainjob.name)
    assert ("trainjobs", NS, trainjob.name) not in api.objects
    with pytest.raises(NotFoundError):
        MPIJobClient(kubeconfig=kubeconfig_path, request_timeout=5).status(trainjob.name)


def test_the_kinds_match_their_crds():
    """Group, version, plural and kind of each run kind, as the CRDs the chart tests validate
    against define them (tests/chart/crds)."""
    for kind, path in ((kinds.MPIJOB, MPIJOB_CRD), (kinds.TRAINJOB, TRAINER_CRDS["TrainJob"])):
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["group"] == kind.group
        assert crd["spec"]["names"]["plural"] == kind.plural
        assert crd["spec"]["names"]["kind"] == kind.name
        assert kind.version in [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
