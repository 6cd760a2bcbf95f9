"""Scheduled retraining: the CronJob, its values file and its least-privilege RBAC."""

from __future__ import annotations

import yaml
from chart_tools import CHART, by_kind, env_of, one, render

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

SCHEDULE = {
    "training": {
        "data": "s3://d/ds",
        "output": "s3://d/out",
        "epochs": 4,
        "checkpoint_interval": 2.5,  # a scheduled run checkpoints as the values say
    },
    "schedule": "0 3 * * 0",
    "s3": {"existingSecret": "keys"},
}


def test_no_schedule_no_cronjob_nor_rbac(helm):
    docs = render(helm, {"training": SCHEDULE["training"]})
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"CronJob", "Role", "RoleBinding"}
    assert len(by_kind(docs, "ServiceAccount")) == 1


def test_cronjob_submits_from_the_mounted_manifest(helm):
    docs = render(helm, SCHEDULE)
    cron = one(docs, "CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == "0 3 * * 0"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    pod = spec["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "finetune-job",
        "submit",
        "--from-manifest",
        "/etc/finetune-job/manifest.yaml",
        "--wait",
        "--schedule",
        one(docs, "CronJob")["metadata"]["name"][:52].rstrip("-"),
    ]
    assert container["image"] == f"finetune-job:{APP_VERSION}"
    assert pod["spec"]["restartPolicy"] == "Never"
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/etc/finetune-job"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    (cm,) = [
        d
        for d in by_kind(docs, "ConfigMap")
        if d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    # The manifest is the MPIJob and config ConfigMap a `helm install` creates, nothing else.
    mpijob, config_map = yaml.safe_load_all(cm["data"]["manifest.yaml"])
    assert mpijob == one(docs, "MPIJob")
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert config_map["metadata"]["name"] == worker["volumes"][0]["configMap"]["name"]
    assert config_map in by_kind(docs, "ConfigMap")
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == {
        **SCHEDULE["training"],
        "model": "resnet18_v2",
        "batch_size": 32,
        "lr": 0.01,
        "metrics_port": 9095,
    }


def test_the_submit_container_reaches_s3_as_the_pods_do(helm):
    """submit reads `latest` and summary.json and saves the launcher log in training.output."""
    docs = render(helm, {**SCHEDULE, "s3": {"existingSecret": "keys", "endpoint": "http://m:9000"}})
    env = env_of(
        one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["AWS_ENDPOINT_URL"] == "http://m:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "keys", "key": "AWS_ACCESS_KEY_ID"}
    }


def test_scheduled_only_still_mounts_the_manifest(helm):
    docs = render(helm, {**SCHEDULE, "runOnInstall": False})
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "manifest.yaml" in d["data"]]
    kinds = [d["kind"] for d in yaml.safe_load_all(cm["data"]["manifest.yaml"])]
    assert kinds == ["MPIJob", "ConfigMap"]


def test_cronjob_options_from_values(helm):
    cron_values = {
        "concurrencyPolicy": "Replace",
        "timeZone": "Europe/Berlin",
        "startingDeadlineSeconds": 600,
        "suspend": True,
        "extraArgs": ["--timeout", "3600"],
    }
    docs = render(helm, {**SCHEDULE, "cronJob": cron_values})
    spec = one(docs, "CronJob")["spec"]
    assert spec["concurrencyPolicy"] == "Replace"
    assert spec["timeZone"] == "Europe/Berlin"
    assert spec["startingDeadlineSeconds"] == 600 and spec["suspend"] is True
    command = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-2:] == ["--timeout", "3600"]


def test_manifest_changes_change_the_checksum(helm):
    def checksum(values):
        cron = one(render(helm, values), "CronJob")
        return cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    changed = {**SCHEDULE, "training": {**SCHEDULE["training"], "epochs": 5}}
    assert checksum(SCHEDULE) == checksum(SCHEDULE) != checksum(changed)


def test_scheduled_only_renders_no_mpijob(helm):
    docs = render(helm, {**SCHEDULE, "runOnInstall": False})
    assert not by_kind(docs, "MPIJob") and by_kind(docs, "CronJob")


def test_role_grants_exactly_what_submitting_needs(helm):
    docs = render(helm, SCHEDULE)
    role = one(docs, "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # no delete: only cronJob.deleteAfter needs it (test_chart_security)
    expected = {("kubeflow.org", "mpijobs", v) for v in ("create", "get", "list", "watch")}
    expected |= {("", "pods", v) for v in ("get", "list", "watch")}
    expected |= {("", "pods/log", "get"), ("", "configmaps", "create")}
    expected |= {("", "events", v) for v in ("list", "watch")}
    assert granted == expected
    assert "*" not in str(role["rules"])
    assert not [r for r in role["rules"] if set(r) - {"apiGroups", "resources", "verbs"}]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")


def test_rolebinding_ties_the_role_to_the_cronjobs_account(helm):
    docs = render(helm, SCHEDULE, namespace="train")
    binding, role = one(docs, "RoleBinding"), one(docs, "Role")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    cron_account = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": cron_account, "namespace": "train"}
    ]
    accounts = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceAccount")}
    assert cron_account in accounts
    job_account = one(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"][
        "serviceAccountName"
    ]
    assert job_account != cron_account  # the training pods get no API rights
