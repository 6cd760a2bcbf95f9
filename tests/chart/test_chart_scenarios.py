"""Every ci/*-values.yaml scenario: helm lint --strict, helm template, strict validation."""

from __future__ import annotations

import subprocess
import tarfile

import pytest
import yaml
from chart_tools import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    MPIJOB_CRD,
    SHARED_MPIJOB_CRD,
    TRAINER_CRDS,
    is_builtin,
    lint,
    render,
    run_helm,
    validate_builtin,
    validate_mpijob,
    validate_trainer,
)

SCENARIOS = pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.stem for p in CI_VALUES])


def test_the_scenarios_exist():
    assert {p.name for p in CI_VALUES} >= {
        "minimal-cpu-values.yaml",
        "multinode-gpu-values.yaml",
        "scheduled-values.yaml",
        "monitoring-values.yaml",
        "gang-values.yaml",
        "kueue-values.yaml",
        "trainjob-values.yaml",
    }


@SCENARIOS
def test_scenario_lints_strictly(helm, values_file):
    out = lint(helm, files=[values_file])
    assert "0 chart(s) failed" in out


@SCENARIOS
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_scenario_renders_objects_that_validate_strictly(helm, values_file, kube_version):
    docs = render(helm, files=[values_file], kube_version=kube_version)
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        assert doc["metadata"]["name"], doc
        assert "namespace" not in doc["metadata"] or doc["kind"] == "ConfigMap"
        if doc["kind"] == "MPIJob":
            validate_mpijob(doc, versions=[kube_version])
        elif doc["kind"] in {"TrainJob", "TrainingRuntime"}:
            validate_trainer(doc, versions=[kube_version])
        elif is_builtin(doc):
            validate_builtin(doc, versions=[kube_version])
        else:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
            assert doc["kind"] in {"PodMonitor", "PrometheusRule"}
    assert "ConfigMap" in kinds
    assert kinds & {"MPIJob", "CronJob", "TrainJob"}
    assert not ({"TrainJob", "TrainingRuntime"} & kinds and "MPIJob" in kinds)


def test_validation_rejects_a_misspelt_mpijob_field(helm):
    docs = render(helm, files=[CI_VALUES[0]])
    (mpijob,) = [d for d in docs if d["kind"] == "MPIJob"]
    mpijob["spec"]["slotPerWorker"] = 1
    with pytest.raises(AssertionError, match="slotPerWorker"):
        validate_mpijob(mpijob)
    del mpijob["spec"]["slotPerWorker"]
    mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["cmd"] = []
    with pytest.raises(Exception, match="cmd"):
        validate_mpijob(mpijob)


def test_crd_copy_matches_shared_schemas():
    if not SHARED_MPIJOB_CRD.is_file():
        pytest.skip(f"{SHARED_MPIJOB_CRD} is not here")
    assert MPIJOB_CRD.read_bytes() == SHARED_MPIJOB_CRD.read_bytes()
    for copy_ in TRAINER_CRDS.values():
        assert copy_.read_bytes() == (SHARED_MPIJOB_CRD.parent / copy_.name).read_bytes()


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    assert chart["type"] == "application"
    assert chart["kubeVersion"].startswith(">=")


def test_package_leaves_ci_scenarios_out(helm, tmp_path):
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("finetune-job-*.tgz")
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert not [n for n in names if "/ci/" in n]
    for needed in (
        "values.schema.json",
        "files/alerts.yaml",
        "files/dashboard.json",
        "templates/NOTES.txt",
        "templates/mpijob.yaml",
    ):
        assert f"finetune-job/{needed}" in names


def _notes(helm, values_file):
    out = run_helm(
        helm,
        "install",
        "ft",
        str(CHART),
        "--namespace",
        "ml",
        "--dry-run=client",
        "-f",
        str(values_file),
    )
    return out.split("NOTES:", 1)[1]


@SCENARIOS
def test_notes_are_numbered_kubectl_commands(helm, values_file):
    notes = _notes(helm, values_file)
    numbers = [int(line.split(".")[0]) for line in notes.splitlines() if line[:1].isdigit()]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 2
    commands = [
        line.strip()
        for line in notes.splitlines()
        if line.strip().startswith(("kubectl ", "helm "))
    ]
    assert commands and all(" -n ml " in c for c in commands)
    for command in commands:
        assert "<" not in command and "{{" not in command, command


def test_notes_name_the_rendered_mpijob(helm):
    notes = _notes(helm, CHART / "ci" / "minimal-cpu-values.yaml")
    assert "kubectl -n ml get mpijob ft-finetune-job -w" in notes
    assert "port-forward pod/ft-finetune-job-worker-0 9095:9095" in notes


def test_lint_of_the_defaults_alone_fails_for_data_and_output(helm):
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "/training/data" in proc.stdout + proc.stderr or "training.data" in proc.stdout


def test_the_gpu_scenario_gives_each_gpu_its_decode_threads_and_a_core_for_the_process():
    """README "Sizing CPU for GPUs": ``data_workers`` decode threads per GPU process keep the
    input ahead of the GPU, and the process itself takes one more core."""
    values = yaml.safe_load((CHART / "ci" / "multinode-gpu-values.yaml").read_text())
    resources = values["workers"]["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert values["slotsPerWorker"] == gpus
    cores = gpus * (values["training"]["data_workers"] + 1)
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == str(cores)
