"""examples/kfp_pipeline.py: the KFP v2 component compiles with its Metrics and
ClassificationMetrics outputs, logs the metrics document in KFP's own artifact shape, and, run
against the fake API server, submits a run, waits for it and logs the run's metrics.

Needs `kfp` (the `kfp` extra: `pip install -e ".[kfp]"`); skipped without it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

kfp = pytest.importorskip(
    "kfp", reason='kfp is not installed: it comes with the `kfp` extra (pip install -e ".[kfp]")'
)
from chart_tools import CHART, run_helm  # noqa: E402
from fake_apiserver import FakeApiServer, kubeconfig, succeeded  # noqa: E402
from kfp.dsl import ClassificationMetrics, Metrics  # noqa: E402

from deploy import constants as c  # noqa: E402
from job.outputs import pipeline_metrics  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import kfp_pipeline  # noqa: E402

SUMMARY = {
    "classes": ["cat", "dog"],
    "val_top1": 0.9,
    "best_val_top1": 0.92,
    "epochs": 2,
    "workers": 2,
    "history": [{"epoch": 2, "train_loss": 0.3, "train_top1": 0.88, "val_top1": 0.9}],
    "confusion_matrix": [[40, 2], [3, 45]],
}


def test_pipeline_compiles_with_metrics_artifacts(tmp_path):
    target = tmp_path / "pipeline.yaml"
    assert kfp_pipeline.main([str(target)]) == 0
    spec = yaml.safe_load(target.read_text())
    component = spec["components"]["comp-finetune"]
    outputs = component["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["classification"]["artifactType"]["schemaTitle"] == (
        "system.ClassificationMetrics"
    )
    assert set(component["inputDefinitions"]["parameters"]) >= {"manifest_yaml", "namespace"}
    (executor,) = spec["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == kfp_pipeline.IMAGE


def test_metrics_document_is_kfps_own_artifact_metadata():
    doc = pipeline_metrics.build(SUMMARY)
    metrics, classification = Metrics(), ClassificationMetrics()
    pipeline_metrics.to_kfp(doc, metrics, classification)
    assert metrics.metadata == doc["metrics"]
    assert classification.metadata == doc["classification_metrics"]


def test_component_submits_waits_and_logs_the_runs_metrics(helm, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # `finetune-job` runs with the project's own packages, whatever path brought kfp in here.
    monkeypatch.delenv("PYTHONPATH", raising=False)

    def write_summary(api, ns, name):
        annotations = api.objects[("mpijobs", ns, name)]["metadata"]["annotations"]
        out = Path(annotations[c.OUTPUT_ANNOTATION])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(SUMMARY))

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"training": {"synthetic": True, "output": str(tmp_path)}}))
    manifest = run_helm(helm, "template", "flowers", str(CHART), "-f", str(values))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    classification = ClassificationMetrics(uri=str(tmp_path / "classification"))
    with FakeApiServer() as api:
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(api.url, "team-a"), encoding="utf-8")
        api.script([(0.05, write_summary), (0.1, succeeded())])
        output = kfp_pipeline.finetune.python_func(
            manifest_yaml=manifest,
            metrics=metrics,
            classification=classification,
            extra_args=f"--kubeconfig {config}",
            timeout_seconds=60,
        )
        submitted = [k for k in api.objects if k[0] == "mpijobs"]
    assert len(submitted) == 1
    assert metrics.metadata["val_top1"] == 0.9 and metrics.metadata["train_loss"] == 0.3
    assert classification.metadata["confusionMatrix"]["rows"] == [
        {"row": [40, 2]},
        {"row": [3, 45]},
    ]
    assert output == ""  # the scripted summary carries no config
