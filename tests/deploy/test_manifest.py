"""Values -> MPIJob: names, labels, values loading, the run's ConfigMap."""

from __future__ import annotations

import datetime as dt
import random

import pytest
import yaml
from chart_tools import validate_mpijob

from deploy import constants as c
from deploy import manifest
from deploy.errors import BadInputError

NOW = dt.datetime(2024, 6, 1, 3, 0, 5, tzinfo=dt.UTC)


def values(**training):
    return manifest.merge(
        manifest.DEFAULTS,
        {"training": {"data": "s3://b/ds", "output": "s3://b/flowers", **training}},
    )


@pytest.mark.parametrize(
    ("prefix", "expected_start"),
    [
        ("finetune-job", "finetune-job-20240601-030005-"),
        ("Nightly_Flowers", "nightly-flowers-20240601-030005-"),
        ("9lives", "r-9lives-20240601-030005-"),
        ("---", "r-20240601-030005-"),
        ("a" * 80, "a" * 29 + "-20240601-030005-"),
    ],
    ids=["plain", "cleaned", "digit-start", "nothing-left", "long-prefix-cut"],
)
def test_run_names(prefix, expected_start):
    name = manifest.run_name(prefix, NOW, random.Random(1))
    assert name.startswith(expected_start)
    assert len(name) <= c.MAX_RUN_NAME
    assert manifest.is_dns_label(name) and name[0].isalpha()
    # Room for the MPI Operator's longest derived pod name.
    assert manifest.is_dns_label(f"{name}-worker-9999")


def test_run_names_differ_within_one_second():
    names = {manifest.run_name("ft", NOW) for _ in range(50)}
    assert len(names) == 50


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("training.epochs=5", {"training": {"epochs": 5}}),
        ("training.lr=0.02", {"training": {"lr": 0.02}}),
        ("training.tta=true", {"training": {"tta": True}}),
        ("image.tag=v1.2", {"image": {"tag": "v1.2"}}),
        ("training.data=", {"training": {"data": ""}}),
    ],
    ids=["int", "float", "bool", "string", "empty"],
)
def test_parse_set(item, expected):
    assert manifest.parse_set(item) == expected


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["epochs"], "expected KEY.PATH=VALUE"),
        (["training..lr=1"], "expected KEY.PATH=VALUE"),
        (["nope=1"], "unknown values key 'nope'"),
        (["workers.replica=3"], "unknown values key 'workers.replica'"),
        (["workers=3"], "values key 'workers' must be a mapping"),
    ],
    ids=["no-equals", "empty-part", "unknown-top", "unknown-nested", "not-a-mapping"],
)
def test_bad_values_fail(sets, match):
    with pytest.raises(BadInputError, match=match):
        manifest.load_values([], sets)


def test_values_files_then_sets(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("workers: {replicas: 4}\ntraining: {epochs: 3, output: s3://b/o}\n")
    v = manifest.load_values([str(f)], ["training.epochs=7", "schedule=0 3 * * *"])
    assert v["workers"]["replicas"] == 4 and v["workers"]["restartPolicy"] == "Never"
    assert v["training"]["epochs"] == 7 and v["training"]["model"] == "resnet18_v2"


def test_values_file_errors(tmp_path):
    with pytest.raises(BadInputError, match="values file .*missing.yaml: No such file"):
        manifest.load_values([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2]")
    with pytest.raises(BadInputError, match="must hold a mapping"):
        manifest.load_values([str(bad)])


def test_launcher_runs_mpirun_over_all_slots():
    v = manifest.merge(
        values(),
        {
            "workers": {"replicas": 3},
            "slotsPerWorker": 4,
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
        },
    )
    cmd = manifest.launcher_command(v)
    assert cmd[:3] == ["mpirun", "-np", "12"]
    assert cmd[-4:] == ["finetune-job", "train", "--config", c.CONFIG_PATH]
    assert " -x NCCL_DEBUG " in " ".join(cmd)
    assert "-bind-to none -map-by slot" in " ".join(cmd)


@pytest.mark.parametrize(
    ("workers", "slots", "threads"),
    [
        ({"ompNumThreads": 3}, 1, 3),
        ({"resources": {"limits": {"cpu": "8"}}}, 2, 4),
        ({"resources": {"requests": {"cpu": 6}}}, 4, 1),
        ({"resources": {"limits": {"cpu": "500m"}}}, 1, 1),
    ],
    ids=["explicit", "limit-split", "request-floor", "millicores"],
)
def test_omp_threads(workers, slots, threads):
    v = manifest.merge(values(), {"workers": workers, "slotsPerWorker": slots})
    assert manifest.omp_num_threads(v) == threads


def test_gpus_must_match_slots():
    v = manifest.merge(values(), {"workers": {"resources": {"limits": {"nvidia.com/gpu": 4}}}})
    with pytest.raises(BadInputError, match=r"slotsPerWorker \(1\) must equal"):
        manifest.build_mpijob(v, manifest.Release.of(v))


def test_run_gets_its_own_name_output_config_and_labels():
    v = values(pretrained="zoo")
    run = manifest.build_run(
        v,
        manifest.Release.of(v, name="ft"),
        schedule="ft-nightly",
        namespace="ml",
        pretrained="s3://b/flowers/runs/old/model.params",
        now=NOW,
        rng=random.Random(0),
    )
    assert run.output == f"s3://b/flowers/runs/{run.name}"
    meta = run.mpijob["metadata"]
    assert meta["name"] == run.name and meta["namespace"] == "ml"
    assert meta["labels"][c.RUN_LABEL] == run.name
    assert meta["labels"][c.SCHEDULE_LABEL] == "ft-nightly"
    assert meta["labels"][c.MANAGED_BY_LABEL] == c.MANAGED_BY
    assert meta["annotations"][c.OUTPUT_ANNOTATION] == run.output
    pod = run.mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]
    assert pod["metadata"]["labels"][c.RUN_LABEL] == run.name
    assert pod["spec"]["serviceAccountName"] == "ft-finetune-job"  # the release's account
    (config_volume,) = [vol for vol in pod["spec"]["volumes"] if vol["name"] == "config"]
    assert config_volume["configMap"]["name"] == run.config_map["metadata"]["name"]
    assert run.config_map["metadata"]["name"] == f"{run.name}-training"
    config = yaml.safe_load(run.config_map["data"][c.CONFIG_KEY])
    assert config["output"] == run.output
    assert config["pretrained"] == "s3://b/flowers/runs/old/model.params"
    validate_mpijob(run.mpijob)


@pytest.mark.parametrize(
    ("training", "match"),
    [
        ({"output": ""}, "training.output .* is required"),
        ({"epochs": "many"}, "values training: config key 'epochs'"),
        ({"model": "vgg16"}, "config key 'model' from values training: must be one of"),
        ({"no_such_key": 1}, "unknown config key 'no_such_key'"),
        ({"data": ""}, "config key 'data' is required"),
    ],
    ids=["no-output", "bad-type", "bad-choice", "unknown-key", "no-data"],
)
def test_bad_training_values_fail_before_submit(training, match):
    v = values(**training)
    with pytest.raises(BadInputError, match=match):
        manifest.build_run(v, manifest.Release.of(v))


def test_schedule_label_default_and_sanitized():
    v = values()
    run = manifest.build_run(v, manifest.Release.of(v))
    assert run.mpijob["metadata"]["labels"][c.SCHEDULE_LABEL] == c.MANUAL_SCHEDULE
    assert manifest.label_value("--Nightly run #3--") == "Nightly-run-3"


def test_release_from_cronjob_values_wins():
    v = manifest.merge(
        values(),
        {
            "release": {
                "name": "prod",
                "fullname": "prod-ft",
                "serviceAccountName": "prod-sa",
                "labels": {
                    "app.kubernetes.io/instance": "prod",
                    "app.kubernetes.io/version": "2.0",
                },
            }
        },
    )
    release = manifest.Release.of(v, name="ignored")
    assert (release.name, release.fullname, release.service_account) == (
        "prod",
        "prod-ft",
        "prod-sa",
    )
    run = manifest.build_run(v, release)
    assert run.name.startswith("prod-ft-")
    container = run.mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["image"] == "finetune-job:2.0"
