"""The scheduled submit pod reaches S3 the way the job pods do: the same S3 environment and
ServiceAccount annotations, from one helper. The CronJob's own command, run end to end
against the real control plane, is in tests/cluster/test_schedule.py."""

from __future__ import annotations

from typing import Any

from chart_tools import one, render, replica_container

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
