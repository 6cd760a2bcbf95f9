"""`finetune-job submit` creates the MPIJob the chart rendered, changed only for the run.

Real helm renders the chart; submit runs as the command does, against the fake API server;
what the server received is compared with what helm rendered.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from chart_tools import CHART, CI_VALUES, by_kind, one, render, validate_mpijob, validate_trainer

from deploy import constants as c
from deploy import entry

RELEASE = "ft"
BASE = {"training": {"data": "s3://b/ds", "output": "s3://b/flowers"}}
CASES = [pytest.param(None, id="defaults")] + [
    pytest.param(path, id=path.name.removesuffix("-values.yaml"))
    for path in CI_VALUES
    if "TrainJob" not in path.read_text()  # submit creates MPIJobs; a TrainJob release has none
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
SERVER_FIELDS = ("namespace", "uid", "creationTimestamp", "resourceVersion")


def submit(*argv: str) -> int:
    """`finetune-job submit ...` as the console script runs it (one line and a code on error)."""
    return entry.main(["submit", *argv])


def created(api, kind: str) -> dict:
    (obj,) = [o for (resource, _, _), o in api.objects.items() if resource == kind]
    return obj


def chart_objects(docs: list[dict]) -> tuple[dict, dict]:
    """The MPIJob helm rendered (for a scheduled-only release: the CronJob's copy of it) and
    the config ConfigMap its launcher mounts."""
    if not by_kind(docs, "MPIJob"):
        (submit_cm,) = [d for d in by_kind(docs, "ConfigMap") if "manifest.yaml" in d["data"]]
        docs = list(yaml.safe_load_all(submit_cm["data"]["manifest.yaml"]))
    mpijob = one(docs, "MPIJob")
    volumes = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if v["name"] == "config")
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == name]
    return mpijob, config_map


def without_run_fields(mpijob: dict) -> dict:
    """The MPIJob less what belongs to one run (and what the API server adds)."""
    out = copy.deepcopy(mpijob)
    meta = out["metadata"]
    for key in ("name", *SERVER_FIELDS):
        meta.pop(key, None)
    for key in (c.RUN_LABEL, c.SCHEDULE_LABEL, c.MANAGED_BY_LABEL):
        meta["labels"].pop(key, None)
    (meta.get("annotations") or {}).pop(c.OUTPUT_ANNOTATION, None)
    if meta.get("annotations") == {}:
        del meta["annotations"]
    for spec in out["spec"]["mpiReplicaSpecs"].values():
        pod = spec["template"]
        for key in (c.RUN_LABEL, c.SCHEDULE_LABEL, c.MANAGED_BY_LABEL):
            pod["metadata"]["labels"].pop(key, None)
        pod["metadata"]["annotations"].pop("checksum/config")
        for volume in pod["spec"]["volumes"]:
            if volume["name"] == "config":
                volume["configMap"]["name"] = "<config>"
    return out


def check_run(api, docs: list[dict], schedule: str = c.MANUAL_SCHEDULE) -> dict:
    """What the server got is the chart's MPIJob but for the run's fields, which are right."""
    chart_mpijob, chart_cm = chart_objects(docs)
    job, cm = created(api, "mpijobs"), created(api, "configmaps")
    name = job["metadata"]["name"]
    assert without_run_fields(job) == without_run_fields(chart_mpijob)
    # The run's own fields.
    assert name.startswith(chart_mpijob["metadata"]["name"] + "-")
    for meta in [job["metadata"]] + [
        s["template"]["metadata"] for s in job["spec"]["mpiReplicaSpecs"].values()
    ]:
        assert meta["labels"][c.RUN_LABEL] == name
        assert meta["labels"][c.SCHEDULE_LABEL] == schedule
        assert meta["labels"][c.MANAGED_BY_LABEL] == c.MANAGED_BY
    chart_config = yaml.safe_load(chart_cm["data"][c.CONFIG_KEY])
    output = f"{chart_config['output']}/runs/{name}"
    assert job["metadata"]["annotations"][c.OUTPUT_ANNOTATION] == output
    # Its ConfigMap: the chart's config.yaml with the run's output, owned by the MPIJob.
    assert cm["metadata"]["name"] == f"{name}-training"
    assert yaml.safe_load(cm["data"][c.CONFIG_KEY]) == {**chart_config, "output": output}
    (owner,) = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("MPIJob", name, job["metadata"]["uid"])
    for spec in job["spec"]["mpiReplicaSpecs"].values():
        (volume,) = [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "config"]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
    validate_mpijob({k: v for k, v in job.items() if k != "status"})
    return job


@pytest.mark.parametrize("path", CASES)
def test_from_manifest_submits_the_rendered_mpijob(helm, api, kubeconfig_path, tmp_path, path):
    docs = render(helm, BASE, files=[path] if path else [], release=RELEASE)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    code = submit("--from-manifest", str(rendered), "--kubeconfig", kubeconfig_path)
    assert code == 0
    check_run(api, docs)


def test_every_option_reaches_the_submitted_mpijob(helm, api, kubeconfig_path, tmp_path):
    values = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in EXTRA.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    docs = render(helm, values, release=RELEASE)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump_all(docs))
    argv = ["--from-manifest", str(tmp_path / "r.yaml"), "--schedule", "nightly"]
    assert submit(*argv, "--kubeconfig", kubeconfig_path) == 0
    job = check_run(api, docs, schedule="nightly")
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 3


def test_values_and_set_are_rendered_by_helm(helm, api, kubeconfig_path, tmp_path):
    """Without --from-manifest, submit runs `helm template` itself: the same objects."""
    values = tmp_path / "prod.yaml"
    values.write_text(yaml.safe_dump({**BASE, "workers": {"replicas": 4}}))
    argv = ["--values", str(values), "--set", "workers.replicas=3", "--set", "training.epochs=2"]
    cluster = ["--kubeconfig", kubeconfig_path, "--helm", str(helm), "--chart", str(CHART)]
    assert submit(*argv, "--release", RELEASE, *cluster) == 0
    docs = render(
        helm, {"workers": {"replicas": 3}, "training": {"epochs": 2}}, [values], release=RELEASE
    )
    job = check_run(api, docs)
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 3


def test_a_label_added_to_the_worker_template_reaches_submit(helm, api, kubeconfig_path, tmp_path):
    """A chart change needs no Python change: add a label to the worker pods in a copy of
    the chart, and submit's MPIJob carries it."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    pod_tpl = chart / "templates" / "_pod.tpl"
    anchor = "    app.kubernetes.io/component: {{ $role }}\n"
    text = pod_tpl.read_text()
    assert anchor in text
    pod_tpl.write_text(
        text.replace(
            anchor, anchor + '    {{- if .worker }}\n    example.com/added: "yes"\n    {{- end }}\n'
        )
    )
    docs = render(helm, BASE, release=RELEASE, chart=chart)
    cluster = ["--kubeconfig", kubeconfig_path, "--helm", str(helm)]
    assert (
        submit(
            "--chart",
            str(chart),
            "--release",
            RELEASE,
            "--set",
            "training.data=s3://b/ds",
            "--set",
            "training.output=s3://b/flowers",
            *cluster,
        )
        == 0
    )
    job = check_run(api, docs)
    pods = {role: s["template"]["metadata"] for role, s in job["spec"]["mpiReplicaSpecs"].items()}
    assert pods["Worker"]["labels"]["example.com/added"] == "yes"
    assert "example.com/added" not in pods["Launcher"]["labels"]
    unchanged = render(helm, BASE, release=RELEASE)
    assert "example.com/added" not in str(unchanged)  # the change is the copy's alone


def test_the_cronjobs_manifest_is_what_helm_install_creates(helm):
    """The scheduled submit starts from the same MPIJob and ConfigMap a `helm install` makes."""
    docs = render(helm, {**BASE, "schedule": "0 3 * * *"}, release=RELEASE)
    (submit_cm,) = [d for d in by_kind(docs, "ConfigMap") if "manifest.yaml" in d["data"]]
    inner = list(yaml.safe_load_all(submit_cm["data"]["manifest.yaml"]))
    assert [d["kind"] for d in inner] == ["MPIJob", "ConfigMap"]
    assert inner[0] == one(docs, "MPIJob")
    assert inner[1] in by_kind(docs, "ConfigMap")


def test_a_manifest_and_values_together_are_refused(api, kubeconfig_path, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("{}")
    code = submit("--from-manifest", str(tmp_path / "r.yaml"), "--set", "training.epochs=2")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune-job: error: --values/--set go to `helm template`")
    assert len(err.strip().splitlines()) == 1 and not api.objects


def test_without_helm_the_error_says_what_to_do(api, kubeconfig_path, capsys):
    code = submit("--set", "training.epochs=2", "--helm", "no-such-helm-binary")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "finetune-job: error: no-such-helm-binary: Helm not found; install it, or pass "
        "--from-manifest FILE (the output of `helm template`)"
    )
    assert not api.objects


def test_helm_errors_are_one_line(helm, api, kubeconfig_path, capsys):
    code = submit(
        "--set", "workers.replica=3", "--helm", str(helm), "--kubeconfig", kubeconfig_path
    )
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "additional properties 'replica' not allowed" in err
    assert not api.objects


def test_no_chart_says_what_to_do(capsys):
    code = submit("--chart", "", "--set", "training.epochs=2", "--dry-run")
    assert code == 2
    assert "no chart to render: give --chart" in capsys.readouterr().err


# ---- the TrainJob target (launch.kind: TrainJob) ---------------------------------------------
TRAINJOB_CASES = [path for path in CI_VALUES if "TrainJob" in path.read_text()]


@pytest.mark.parametrize("path", TRAINJOB_CASES, ids=lambda p: p.name)
def test_from_manifest_submits_the_rendered_trainjob(helm, api, kubeconfig_path, tmp_path, path):
    """A TrainJob run: the rendered TrainJob but for the run's name, labels, output annotation
    and launcher arguments (the runtime's mpirun line plus --output); no ConfigMap of its own,
    as its pods mount the release's (Trainer lets a TrainJob change args, not volumes)."""
    docs = render(helm, BASE, files=[path], release=RELEASE)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    assert submit("--from-manifest", str(rendered), "--kubeconfig", kubeconfig_path) == 0
    chart_job, runtime = one(docs, "TrainJob"), one(docs, "TrainingRuntime")
    job = created(api, "trainjobs")
    assert not [k for k in api.objects if k[0] == "configmaps"]
    name = job["metadata"]["name"]
    assert name.startswith(chart_job["metadata"]["name"] + "-")
    labels = job["metadata"]["labels"]
    assert (labels[c.RUN_LABEL], labels[c.SCHEDULE_LABEL]) == (name, c.MANUAL_SCHEDULE)
    assert labels[c.MANAGED_BY_LABEL] == c.MANAGED_BY
    output = f"{BASE['training']['output']}/runs/{name}"
    assert job["metadata"]["annotations"][c.OUTPUT_ANNOTATION] == output
    launcher = next(
        r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "launcher"
    )["template"]["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["trainer"]["args"] == [*launcher["args"], "--output", output]
    # Everything else is as rendered.
    same = copy.deepcopy(job)
    for key in ("name", *SERVER_FIELDS):
        same["metadata"].pop(key, None)
    for key in (c.RUN_LABEL, c.SCHEDULE_LABEL, c.MANAGED_BY_LABEL):
        same["metadata"]["labels"].pop(key)
    del same["metadata"]["annotations"], same["spec"]["trainer"]["args"]
    expected = copy.deepcopy(chart_job)
    del expected["metadata"]["name"]
    expected["metadata"]["labels"].pop(c.MANAGED_BY_LABEL)  # Helm's; the run is submit's
    assert same == expected
    validate_trainer({k: v for k, v in job.items() if k != "status"})


def test_the_trainjob_runs_flags_parse_as_the_jobs_config(helm, tmp_path):
    """The TrainJob's launcher args end in flags that the job's own parser takes, and they
    win over the config file the runtime mounts."""
    from deploy import manifest
    from job import sources

    path = next(iter(TRAINJOB_CASES))
    rendered = manifest.parse(yaml.safe_dump_all(render(helm, BASE, files=[path])), "x.yaml")
    run = manifest.build_run(rendered, pretrained="s3://b/flowers/runs/r0/model.params")
    args = run.job["spec"]["trainer"]["args"]
    argv = args[args.index("finetune-job") + 1 :]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(rendered.config_map["data"][c.CONFIG_KEY])
    argv[argv.index("--config") + 1] = str(config_file)
    cfg = sources.load(vars(entry.build_parser().parse_args(argv)), environ={})
    assert cfg.output == run.output
    assert cfg.pretrained == "s3://b/flowers/runs/r0/model.params"
