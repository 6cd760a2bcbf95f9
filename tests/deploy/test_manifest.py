"""The patcher: what Helm rendered -> one run (name, labels, output, its own ConfigMap)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random

import pytest
import yaml
from chart_tools import by_kind, one, render, validate_mpijob

from deploy import constants as c
from deploy import manifest
from deploy.errors import BadInputError

NOW = dt.datetime(2024, 6, 1, 3, 0, 5, tzinfo=dt.UTC)
TRAINING = {"data": "s3://b/ds", "output": "s3://b/flowers"}


@pytest.fixture(scope="module")
def docs(helm):
    """`helm template ft` of the chart with a schedule: MPIJob, ConfigMaps, CronJob, ..."""
    return render(helm, {"training": TRAINING, "schedule": "0 3 * * *"}, release="ft")


@pytest.fixture(scope="module")
def text(docs):
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture
def rendered(text):
    return manifest.parse(text, "rendered.yaml")


def with_training(rendered: manifest.Rendered, **training) -> manifest.Rendered:
    """The same rendered objects with other config.yaml keys (as other values would give)."""
    cm = yaml.safe_load(yaml.safe_dump(rendered.config_map))
    cm["data"][c.CONFIG_KEY] = yaml.safe_dump({**rendered.training, **training})
    return manifest.Rendered(rendered.job, cm, rendered.source)


def test_parse_finds_the_mpijob_and_the_configmap_it_mounts(rendered, docs):
    assert rendered.job == one(docs, "MPIJob")
    assert rendered.config_map["metadata"]["name"] == "ft-finetune-job-training"
    assert rendered.training == {
        **TRAINING,
        "model": "resnet18_v2",
        "epochs": 10,
        "batch_size": 32,
        "lr": 0.01,
        "metrics_port": 9095,
    }


def test_without_an_mpijob_the_submit_configmaps_manifest_is_used(docs, rendered):
    """`helm template --set runOnInstall=false` renders no MPIJob; the CronJob's copy is it."""
    scheduled_only = [d for d in docs if d["kind"] != "MPIJob"]
    got = manifest.parse(yaml.safe_dump_all(scheduled_only), "release.yaml")
    assert got.job == rendered.job and got.config_map == rendered.config_map
    assert got.source == f"release.yaml ({manifest.MANIFEST_KEY})"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda ds: [d for d in ds if d["kind"] not in ("MPIJob", "ConfigMap")],
            r"x.yaml holds no kubeflow.org/v2beta1 MPIJob",
        ),
        (lambda ds: ds + [one(ds, "MPIJob")], r"x.yaml holds 2 runs \(MPIJob ft-finetune-job, "),
        (
            lambda ds: [d for d in ds if d["kind"] != "ConfigMap"],
            r"x.yaml lacks the ConfigMap ft-finetune-job-training that the MPIJob mounts",
        ),
        (lambda ds: ds + ["just a string"], "every YAML document must be a Kubernetes object"),
    ],
    ids=["no-mpijob", "two-mpijobs", "no-configmap", "not-an-object"],
)
def test_bad_manifests_are_named(docs, mutate, match):
    with pytest.raises(BadInputError, match=match):
        manifest.parse(yaml.safe_dump_all(mutate(list(docs))), "x.yaml")


def test_not_yaml_and_missing_file_are_named(tmp_path):
    with pytest.raises(BadInputError, match=r"^x.yaml is not valid YAML: "):
        manifest.parse("a: [1,\n", "x.yaml")
    with pytest.raises(BadInputError, match=r"manifest .*missing.yaml: No such file"):
        manifest.read(str(tmp_path / "missing.yaml"))


def test_run_gets_its_own_name_output_config_and_labels(rendered):
    run = manifest.build_run(
        with_training(rendered, pretrained="zoo"),
        schedule="ft-nightly",
        namespace="ml",
        pretrained="s3://b/flowers/runs/old/model.params",
        now=NOW,
        rng=random.Random(0),
    )
    assert run.name.startswith("ft-finetune-job-20240601-030005-")
    assert run.output == f"s3://b/flowers/runs/{run.name}"
    meta = run.job["metadata"]
    assert meta["name"] == run.name and meta["namespace"] == "ml"
    assert meta["labels"][c.RUN_LABEL] == run.name
    assert meta["labels"][c.SCHEDULE_LABEL] == "ft-nightly"
    assert meta["labels"][c.MANAGED_BY_LABEL] == c.MANAGED_BY
    assert meta["annotations"][c.OUTPUT_ANNOTATION] == run.output
    for role in ("Launcher", "Worker"):
        pod = run.job["spec"]["mpiReplicaSpecs"][role]["template"]
        assert pod["metadata"]["labels"][c.RUN_LABEL] == run.name
        assert pod["spec"]["serviceAccountName"] == "ft-finetune-job"  # the release's account
        (config_volume,) = [vol for vol in pod["spec"]["volumes"] if vol["name"] == "config"]
        assert config_volume["configMap"]["name"] == run.config_map["metadata"]["name"]
    assert run.config_map["metadata"]["name"] == f"{run.name}-training"
    assert run.config_map["metadata"]["namespace"] == "ml"
    assert run.config_map["metadata"]["labels"][c.RUN_LABEL] == run.name
    config = yaml.safe_load(run.config_map["data"][c.CONFIG_KEY])
    assert config["output"] == run.output
    assert config["pretrained"] == "s3://b/flowers/runs/old/model.params"
    validate_mpijob(run.job)


def test_the_rendered_objects_are_left_alone(rendered):
    before = yaml.safe_dump_all([rendered.job, rendered.config_map])
    manifest.build_run(rendered, schedule="x")
    assert yaml.safe_dump_all([rendered.job, rendered.config_map]) == before


def test_the_pods_checksum_is_the_runs_config(rendered):
    run = manifest.build_run(rendered)
    text = run.config_map["data"][c.CONFIG_KEY]
    for spec in run.job["spec"]["mpiReplicaSpecs"].values():
        checksum = spec["template"]["metadata"]["annotations"]["checksum/config"]
        assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()


@pytest.mark.parametrize(
    ("training", "match"),
    [
        ({"output": ""}, "training.output .* is required"),
        ({"epochs": "many"}, "config key 'epochs' from values training"),
        ({"model": "vgg16"}, "config key 'model' from values training: must be one of"),
        ({"no_such_key": 1}, "unknown config key 'no_such_key'"),
        ({"data": ""}, "config key 'data' is required"),
    ],
    ids=["no-output", "bad-type", "bad-choice", "unknown-key", "no-data"],
)
def test_bad_training_values_fail_before_submit(rendered, training, match):
    """job.config's own rules judge the run's config (no copy of them here)."""
    with pytest.raises(BadInputError, match=match):
        manifest.build_run(with_training(rendered, **training))


def test_schedule_label_default_and_sanitized(rendered):
    run = manifest.build_run(rendered)
    assert run.job["metadata"]["labels"][c.SCHEDULE_LABEL] == c.MANUAL_SCHEDULE
    assert manifest.label_value("--Nightly run #3--") == "Nightly-run-3"


def test_name_prefix_and_dns_names(rendered):
    run = manifest.build_run(rendered, prefix="Nightly_Flowers")
    assert run.name.startswith("nightly-flowers-")
    assert manifest.is_dns_label(f"{run.name}-worker-9999")


def test_s3_settings_are_the_pods(helm):
    docs = render(helm, {"training": TRAINING, "s3": {"endpoint": "http://minio:9000"}})
    rendered = manifest.parse(yaml.safe_dump_all(docs), "r.yaml")
    assert manifest.s3_endpoint_and_region(rendered) == ("http://minio:9000", "")
    ours = with_training(rendered, s3_endpoint_url="http://other:9000", s3_region="eu")
    assert manifest.s3_endpoint_and_region(ours) == ("http://other:9000", "eu")


def test_the_cronjob_mounts_the_manifest_submit_reads(docs):
    cron = one(docs, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    path = command[command.index("--from-manifest") + 1]
    mount_dir, key = path.rsplit("/", 1)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == mount_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (cm,) = [
        d
        for d in by_kind(docs, "ConfigMap")
        if d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    assert key == manifest.MANIFEST_KEY
    got = manifest.parse(cm["data"][key], path)
    assert got.job == one(docs, "MPIJob")
    (training_cm,) = [
        d
        for d in by_kind(docs, "ConfigMap")
        if d["metadata"]["name"] == got.config_map["metadata"]["name"]
    ]
    assert got.config_map == training_cm
