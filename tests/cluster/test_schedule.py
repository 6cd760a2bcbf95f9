"""Scheduled retraining on the real controllers: the CronJob controller starts the submit Job
on the chart's schedule and holds its concurrencyPolicy; the submit container's own command
line, run here as a process with a token of the submit ServiceAccount (TokenRequest),
creates the run on the real API server, waits for it, saves its log, gates and promotes.

kwok plays the pods: the submit Job's pod is held Running (as a long submit --wait is), so
the next tick must be refused (Forbid); the container itself runs here, with only the
environment and files the chart gives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from chart_tools import mounted_files, rendered_env
from cluster_tools import HOLD, Helm, Play, eventually, install, token_kubeconfig

from deploy import constants as c

S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
TICK_SECONDS = 150.0  # a minute's schedule, with room for the controller's own delay


@pytest.fixture
def s3(s3_server: str) -> Any:
    client = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    client.create_bucket(Bucket="sched")
    yield client
    for obj in client.list_objects_v2(Bucket="sched").get("Contents", []):
        client.delete_object(Bucket="sched", Key=obj["Key"])
    client.delete_bucket(Bucket="sched")


def test_the_cronjob_starts_submit_which_runs_gates_and_promotes(
    api: Any, helm: Helm, namespace: str, s3: Any, s3_server: str, tmp_path: Path
) -> None:
    from kubernetes import client as k8s

    core: Any = k8s.CoreV1Api(api)
    batch: Any = k8s.BatchV1Api(api)
    root = "s3://sched/flowers"
    s3.put_object(Bucket="sched", Key="flowers/runs/r0/model.params", Body=b"weights")
    pointer = {"run": "r0", "model": f"{root}/runs/r0/model.params", "val_top1": 0.5}
    s3.put_object(Bucket="sched", Key="flowers/latest", Body=json.dumps(pointer).encode())
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "s3-keys"}, "stringData": S3_KEYS}
    )
    values = {
        "training": {"data": "s3://sched/data", "output": root, "pretrained": f"{root}/latest"},
        "workers": {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
        "podAnnotations": {HOLD: "true"},
        "schedule": "* * * * *",
        "runOnInstall": False,
        "s3": {"existingSecret": "s3-keys", "endpoint": s3_server, "region": "us-east-1"},
        # Suspended until its submit pods are held (below), so no tick comes before that.
        "cronJob": {"extraArgs": ["--timeout", "180", "--not-worse"], "suspend": True},
    }
    made = install(helm, "sch", namespace, values=values)
    cronjob = next(d for d in made if d["kind"] == "CronJob")["metadata"]["name"]
    assert next(d for d in made if d["kind"] == "CronJob")["spec"]["concurrencyPolicy"] == "Forbid"
    # Hold the submit pods Running, as a submit that waits for its run is.
    template = {"metadata": {"annotations": {HOLD: "true"}}}
    batch.patch_namespaced_cron_job(
        cronjob, namespace, {"spec": {"jobTemplate": {"spec": {"template": template}}}}
    )
    batch.patch_namespaced_cron_job(cronjob, namespace, {"spec": {"suspend": False}})

    def jobs() -> list[Any]:
        return list(batch.list_namespaced_job(namespace).items)

    (job,) = eventually("the CronJob controller's submit Job", jobs, TICK_SECONDS)
    assert job.metadata.owner_references[0].name == cronjob
    refused = eventually(
        "the next tick refused while the first submit runs (JobAlreadyActive)",
        lambda: _events(core, namespace, cronjob, "JobAlreadyActive"),
        TICK_SECONDS,
    )
    assert refused and [j.metadata.name for j in jobs()] == [job.metadata.name]

    # The submit pod's container, run here with what the chart gives it.
    pod = api.sanitize_for_serialization(job.spec.template)["spec"]
    container = pod["containers"][0]
    maps = [
        {**api.sanitize_for_serialization(m), "kind": "ConfigMap"}
        for m in core.list_namespaced_config_map(namespace).items
    ]
    command = list(container["command"])
    for mount, local in mounted_files(maps, pod, tmp_path / "mounts").items():
        command = [arg.replace(mount, local) for arg in command]
    env = rendered_env(container, {"s3-keys": S3_KEYS})
    env["KUBECONFIG"] = token_kubeconfig(api, namespace, pod["serviceAccountName"], tmp_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"
    env["HOME"] = str(tmp_path)  # no ~/.aws or ~/.kube of the machine running the test
    submit = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    play = Play(api, namespace, tmp_path)
    run = _scheduled_run(api, namespace, cronjob, submit)
    launcher = play.launcher(run)
    play.log(launcher, ["trained"])
    output = play.output(run).removeprefix("s3://sched/")
    summary = json.dumps({"val_top1": 0.9}).encode()
    s3.put_object(Bucket="sched", Key=f"{output}/summary.json", Body=summary)
    play.release(launcher)
    out, err = submit.communicate(timeout=240)
    assert submit.returncode == 0, err

    latest = json.loads(s3.get_object(Bucket="sched", Key="flowers/latest")["Body"].read())
    assert latest["run"] == run and latest["val_top1"] == 0.9
    log = s3.get_object(Bucket="sched", Key=f"flowers/runs/{run}/launcher.log")["Body"].read()
    assert log == b"trained\n"
    assert f"pretrained {root}/latest -> {root}/runs/r0/model.params" in err


def _events(core: Any, namespace: str, name: str, reason: str) -> list[Any]:
    items = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return [e for e in items if e.reason == reason]


def _scheduled_run(api: Any, namespace: str, schedule: str, submit: subprocess.Popen[str]) -> str:
    from kubernetes import client as k8s

    custom: Any = k8s.CustomObjectsApi(api)

    def runs() -> list[str]:
        if submit.poll() is not None:
            raise AssertionError(f"submit exited {submit.returncode}: {submit.communicate()}")
        listed = custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, label_selector=f"{c.SCHEDULE_LABEL}={schedule}"
        )
        return [item["metadata"]["name"] for item in listed["items"]]

    (name,) = eventually("the run the scheduled submit created", runs)
    return name
