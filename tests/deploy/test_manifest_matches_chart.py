"""deploy.manifest builds the MPIJob the chart renders, from the same values (real helm)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import yaml
from chart_tools import CHART, CI_VALUES, by_kind, one, render, validate_mpijob

from deploy import constants as c
from deploy import manifest

RELEASE, NAMESPACE = "ft", "ml"
BASE = {"training": {"data": "s3://b/ds", "output": "s3://b/flowers"}}
CASES = [pytest.param(None, id="defaults")] + [
    pytest.param(path, id=path.name.removesuffix("-values.yaml")) for path in CI_VALUES
]
EXTRA = {
    "slotsPerWorker": 2,
    "fullnameOverride": "flowers",
    "workers": {
        "replicas": 3,
        "ompNumThreads": 0,
        "shmSize": "",
        "resources": {"limits": {"cpu": "8", "nvidia.com/gpu": 2}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "priorityClassName": "high",
    },
    "launcher": {"nodeSelector": {"pool": "cpu"}},
    "runPolicy": {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": None},
    "s3": {
        "endpoint": "http://minio:9000",
        "region": "eu",
        "existingSecret": "s3-keys",
        "webIdentity": True,
    },
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
    "mpirun": {"extraArgs": ["-mca", "btl_tcp_if_include", "eth0"]},
    "cudaCache": {"enabled": True, "volume": {"persistentVolumeClaim": {"claimName": "cc"}}},
    "extraVolumes": [{"name": "data", "emptyDir": {}}],
    "extraVolumeMounts": [{"name": "data", "mountPath": "/data"}],
    "image": {"tag": "1.2.3", "pullSecrets": [{"name": "reg"}]},
    "podLabels": {"team": "vision"},
    "podAnnotations": {"note": "x"},
    "serviceAccount": {"create": False, "name": "trainer"},
    "training": {"metrics_port": 9100, "lr_steps": [30, 60], "tta": True},
}


def chart_values(path: Path | None, extra: dict | None = None) -> dict:
    values = manifest.DEFAULTS
    # The order `render` gives helm: the file, then the dict.
    for doc in (yaml.safe_load(path.read_text()) if path else {}, BASE, extra or {}):
        values = manifest.merge(values, doc)
    return values


def test_defaults_mirror_values_yaml():
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {k: chart[k] for k in manifest.DEFAULTS} == manifest.DEFAULTS
    assert set(chart) - set(manifest.DEFAULTS) <= manifest.IGNORED_KEYS


@pytest.mark.parametrize("path", CASES)
def test_same_mpijob_as_the_chart(helm, path):
    docs = render(helm, BASE, files=[path] if path else [], release=RELEASE, namespace=NAMESPACE)
    values = chart_values(path)
    if not values.get("runOnInstall", True):
        assert not by_kind(docs, "MPIJob")
        return
    built = manifest.build_mpijob(values, manifest.Release.of(values, name=RELEASE))
    assert built == one(docs, "MPIJob")
    validate_mpijob(built)


def test_same_mpijob_with_every_option(helm):
    docs = render(helm, manifest.merge(BASE, EXTRA), release=RELEASE, namespace=NAMESPACE)
    values = chart_values(None, EXTRA)
    chart_mpijob = one(docs, "MPIJob")
    assert manifest.build_mpijob(values, manifest.Release.of(values, name=RELEASE)) == chart_mpijob
    # The config file the chart mounts is the one a run's ConfigMap carries.
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "flowers-training"]
    assert cm["data"][c.CONFIG_KEY] == manifest.config_yaml(values["training"])
    checksum = chart_mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"][
        "annotations"
    ]["checksum/config"]
    assert checksum == hashlib.sha256(cm["data"][c.CONFIG_KEY].rstrip("\n").encode()).hexdigest()


def test_cronjob_values_build_a_run_like_the_chart(helm):
    """What the chart's CronJob mounts for `finetune-job submit` gives the chart's MPIJob,
    but for the run's own name, labels, output and ConfigMap."""
    docs = render(
        helm, manifest.merge(BASE, {"schedule": "0 3 * * *"}), release=RELEASE, namespace=NAMESPACE
    )
    (submit_cm,) = [d for d in by_kind(docs, "ConfigMap") if "values.yaml" in d["data"]]
    cronjob = one(docs, "CronJob")
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["finetune-job", "submit"] and "--wait" in command
    values = manifest.load_values(
        [],
        [],
        base=manifest.merge(manifest.DEFAULTS, yaml.safe_load(submit_cm["data"]["values.yaml"])),
    )
    release = manifest.Release.of(values)
    run = manifest.build_run(values, release, schedule=cronjob["metadata"]["name"])
    chart_mpijob = one(docs, "MPIJob")
    validate_mpijob(run.mpijob)
    ours = copy.deepcopy(run.mpijob)
    assert ours["metadata"]["labels"][c.RUN_LABEL] == run.name
    assert run.name.startswith(chart_mpijob["metadata"]["name"] + "-")
    # Same spec once the per-run differences are taken out.
    strip_run(ours, run.name, chart_mpijob["metadata"]["name"])
    strip_run(chart_mpijob, run.name, chart_mpijob["metadata"]["name"])
    assert ours["spec"] == chart_mpijob["spec"]


def strip_run(mpijob: dict, run: str, fullname: str) -> None:
    for spec in mpijob["spec"]["mpiReplicaSpecs"].values():
        meta = spec["template"]["metadata"]
        meta["annotations"].pop("checksum/config")  # the run's output differs, so does this
        for key in (c.RUN_LABEL, c.SCHEDULE_LABEL, c.MANAGED_BY_LABEL):
            meta["labels"].pop(key, None)
        for volume in spec["template"]["spec"]["volumes"]:
            if volume["name"] == "config":
                volume["configMap"]["name"] = volume["configMap"]["name"].replace(run, fullname)
