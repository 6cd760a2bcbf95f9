"""What a real `finetune-job train` run writes for tools: Katib's StdOut collector and SageMaker
regexes over its output, one JSON object per stderr line with `--log-format json`, and the
Kubeflow Pipelines metrics file."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

# Katib's default StdOut metrics filter (kubeflow/katib pkg/metricscollector/v1beta1/common).
KATIB_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TIMEOUT = 600


def katib_collect(output: str, names: list[str]) -> dict[str, list[float]]:
    """What Katib's file metrics collector (TEXT format, default filter) records: every line
    that names a metric, every `name=value` match of the filter whose name is a metric."""
    found: dict[str, list[float]] = {n: [] for n in names}
    for line in output.splitlines():
        if not any(n in line for n in names):
            continue
        for match in KATIB_FILTER.findall(line):
            if match[0] in found and match[1]:
                found[match[0]].append(float(match[1]))
    return found


def train(tiny_dataset: str, out: Path, env: dict[str, str], *extra: str, merged: bool):
    cmd = [
        "finetune-job",
        "train",
        *("--data", tiny_dataset, "--output", str(out)),
        *("--pretrained", "none", "--head-lr-mult", "1", "--image-size", "32"),
        *("--batch-size", "8", "--epochs", "2", "--log-interval", "2"),
        *("--metrics-port", "0", "--data-workers", "2", "--threads", "1"),
        *extra,
    ]
    proc = subprocess.run(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]
    return proc


@pytest.fixture(scope="module")
def text_run(tiny_dataset, launch_env, tmp_path_factory):
    """Default text logs; stdout and stderr in one stream, as Katib's collector reads them."""
    out = tmp_path_factory.mktemp("text-run") / "out"
    proc = train(tiny_dataset, out, launch_env, merged=True)
    return proc.stdout, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def json_run(tiny_dataset, launch_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("json-run") / "out"
    metrics_file = out.parent / "pipeline" / "metrics.json"
    proc = train(
        tiny_dataset,
        out,
        launch_env,
        *("--log-format", "json", "--metrics-file", str(metrics_file)),
        merged=False,
    )
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary, json.loads(metrics_file.read_text())


@pytest.mark.slow
def test_katib_default_filter_finds_one_val_top1_per_epoch_equal_to_the_summary(text_run):
    output, summary = text_run
    names = ["val_top1", "train_loss", "train_top1", "lr", "images_per_second", "epoch"]
    found = katib_collect(output, names)
    assert found["val_top1"] == [h["val_top1"] for h in summary["history"]]
    assert found["train_loss"] == [h["train_loss"] for h in summary["history"]]
    assert found["epoch"] == [1, 2]
    assert len(found["lr"]) == 2 and all(v > 0 for v in found["lr"])


@pytest.mark.slow
def test_metrics_lines_start_with_an_rfc3339_utc_timestamp(text_run):
    output, summary = text_run
    lines = [line for line in output.splitlines() if " val_top1=" in line]
    assert len(lines) == len(summary["history"])
    for line, record in zip(lines, summary["history"], strict=True):
        assert re.match(RFC3339 + rf" epoch={record['epoch']} train_loss=", line), line
        # a SageMaker metric definition's regex
        assert float(re.search(r"val_top1=([0-9\.]+)", line)[1]) == record["val_top1"]


@pytest.mark.slow
def test_text_logs_carry_one_timestamp_format_and_the_eta(text_run):
    output, _ = text_run
    logged = [line for line in output.splitlines() if re.match(r"\d{4}-", line)]
    assert logged and all(re.match(RFC3339 + " ", line) for line in logged)
    steps = [line for line in logged if " step " in line and " img/s " in line]
    assert re.search(r"ETA (\d+s|\d+m\d\ds|\d+h\d\dm)$", steps[-2]), steps[-2]
    assert steps[-1].endswith("ETA 0s")  # the run's last step


@pytest.mark.slow
def test_json_logs_are_one_object_per_stderr_line(json_run):
    proc, summary, _ = json_run
    lines = proc.stderr.splitlines()
    assert lines
    objects = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all(isinstance(o, dict) and re.fullmatch(RFC3339, o["time"]) for o in objects)
    steps = [o for o in objects if o.get("event") == "step"]
    epochs = [o for o in objects if o.get("event") == "epoch"]
    assert [e["val_top1"] for e in epochs] == [h["val_top1"] for h in summary["history"]]
    assert steps[-1]["progress_ratio"] == 1.0 and steps[-1]["eta_seconds"] == 0.0
    assert any(o["level"] == "INFO" and o["message"].startswith("config ") for o in objects)
    # The metrics lines go to stdout, one per epoch.
    assert len(proc.stdout.splitlines()) == 2 and "val_top1=" in proc.stdout


@pytest.mark.slow
def test_metrics_file_holds_kfp_metrics_of_the_run(json_run):
    _, summary, doc = json_run
    metrics = doc["metrics"]
    assert metrics["val_top1"] == summary["val_top1"]
    assert metrics["best_val_top1"] == summary["best_val_top1"]
    assert metrics["train_loss"] == summary["history"][-1]["train_loss"]
    assert metrics["epochs"] == 2 and metrics["workers"] == 1
    assert all(isinstance(v, int | float) for v in metrics.values())
    if "confusion_matrix" in summary:  # only when the evaluation gives one
        cm = doc["classification_metrics"]["confusionMatrix"]
        assert [a["displayName"] for a in cm["annotationSpecs"]] == summary["classes"]
    else:
        assert "classification_metrics" not in doc
