"""The scheduled submit pod reaches S3 the way the job pods do: the same S3 environment and
ServiceAccount annotations, from one helper. End to end: the CronJob's own command, run
with only the environment the chart rendered for it, against the fake API server and the
local S3 server, with a ``latest`` to resolve, saves the log, gates and promotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from chart_tools import one, render, replica_container
from fake_apiserver import running, succeeded

from deploy import constants as c

SECRET = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_NAMES = {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def submit_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_the_submit_pod_gets_the_job_pods_s3_env_and_service_account_annotations(helm):
    annotations = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    values = {
        "training": {"output": "s3://runs/flowers", "synthetic": True},
        "schedule": "0 3 * * 0",
        "s3": {"existingSecret": "s3-keys", "endpoint": "http://s3:9000", "region": "eu-1"},
        "serviceAccount": {"annotations": annotations},
    }
    docs = render(helm, values)
    submit_env = submit_pod(docs)["containers"][0]["env"]
    launcher_env = replica_container(one(docs, "MPIJob"), "Launcher")["env"]
    assert submit_env == [e for e in launcher_env if e["name"] in S3_NAMES]
    assert {e["name"] for e in submit_env} == S3_NAMES
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    submit_account = accounts[submit_pod(docs)["serviceAccountName"]]
    assert submit_account["metadata"]["annotations"] == annotations
    job_account = replica_pod_account(docs)
    assert accounts[job_account]["metadata"]["annotations"] == annotations


def replica_pod_account(docs: list[dict[str, Any]]) -> str:
    spec = one(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    return spec["serviceAccountName"]


def rendered_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (secretKeyRef resolved)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def mounted_files(docs: list[dict[str, Any]], pod: dict[str, Any], root: Path) -> dict[str, str]:
    """Write each mounted ConfigMap's keys under ``root``; {mount path: local folder}."""
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        for key, text in maps[volumes[mount["name"]]["configMap"]["name"]]["data"].items():
            (folder / key).write_text(text)
        paths[mount["mountPath"]] = str(folder)
    return paths


def test_the_rendered_submit_command_runs_with_only_the_rendered_environment(
    helm, api, kubeconfig_path, s3_server, tmp_path
):
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="sched")
    root = "s3://sched/flowers"
    s3.put_object(Bucket="sched", Key="flowers/runs/r0/model.params", Body=b"weights")
    pointer = {"run": "r0", "model": f"{root}/runs/r0/model.params", "val_top1": 0.5}
    s3.put_object(Bucket="sched", Key="flowers/latest", Body=json.dumps(pointer).encode())
    values = {
        "training": {"output": root, "synthetic": True, "pretrained": f"{root}/latest"},
        "schedule": "0 3 * * 0",
        "runOnInstall": False,
        "s3": {"existingSecret": "s3-keys", "endpoint": s3_server, "region": "us-east-1"},
        "cronJob": {"extraArgs": ["--timeout", "60", "--not-worse"]},
    }
    docs = render(helm, values, namespace="team-a")
    pod = submit_pod(docs)
    container = pod["containers"][0]
    paths = mounted_files(docs, pod, tmp_path / "mounts")
    command = list(container["command"])
    for mount, local in paths.items():  # the mounted files, where this test put them
        command = [arg.replace(mount, local) for arg in command]

    def summary_in_s3(api_, ns, name):
        output = api_.objects[("mpijobs", ns, name)]["metadata"]["annotations"]
        key = output[c.OUTPUT_ANNOTATION][len("s3://sched/") :] + "/summary.json"
        s3.put_object(Bucket="sched", Key=key, Body=json.dumps({"val_top1": 0.9}).encode())

    api.script([(0.05, running("trained\n")), (0.1, summary_in_s3), (0.15, succeeded())])
    # Only what the chart rendered, plus the cluster access the pod's token would give.
    env = dict(rendered_env(container, {"s3-keys": SECRET}), KUBECONFIG=kubeconfig_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"
    env["HOME"] = str(tmp_path)  # no ~/.aws of the machine running the test
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    latest = json.loads(s3.get_object(Bucket="sched", Key="flowers/latest")["Body"].read())
    assert latest["val_top1"] == 0.9 and latest["run"] != "r0"
    log = f"flowers/runs/{latest['run']}/launcher.log"
    assert s3.get_object(Bucket="sched", Key=log)["Body"].read() == b"trained\n"
