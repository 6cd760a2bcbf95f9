"""What a real (small) run hands over: ONNX checked in the run, Triton repository, eval.json,
history.csv, report.html, the best epoch; and `finetune-job export --onnx` for an old run."""

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import onnx
import pytest

from job.outputs import export
from job.outputs.evaluate import evaluate_export
from job.storage import Storage
from job.training import lifecycle, loop


def read(out, name):
    return json.load(open(os.path.join(out, name)))


def test_summary_records_the_onnx_check_and_the_exported_epoch(finished_run):
    out, summary = finished_run
    on_disk = read(out, "summary.json")
    assert on_disk["onnx"]["max_abs_diff"] <= 1e-4
    assert 0 <= on_disk["onnx"]["top1_agreement"] <= 1
    assert on_disk["onnx"]["batch_sizes"] == [1, 7]
    assert on_disk["exported_epoch"] == export.best_epoch(on_disk["history"])
    exported = on_disk["history"][on_disk["exported_epoch"] - 1]
    assert on_disk["val_top1"] == exported["val_top1"]
    model = onnx.load(os.path.join(out, "model.onnx"))
    assert model.opset_import[0].version == 13 and model.ir_version == 7


def test_triton_repository_holds_both_models_with_labels(finished_run):
    out, summary = finished_run
    for name, tensor in (("finetune", "data"), ("finetune_uint8", "image")):
        folder = os.path.join(out, "triton", name)
        assert sorted(os.listdir(folder)) == ["1", "config.pbtxt", "labels.txt"]
        assert open(os.path.join(folder, "labels.txt")).read().split() == summary["classes"]
        text = open(os.path.join(folder, "config.pbtxt")).read()
        assert f'name: "{name}"' in text and f'name: "{tensor}"' in text
        model = onnx.load(os.path.join(folder, "1", "model.onnx"))
        assert model.graph.input[0].name == tensor


def test_eval_json_matrix_sums_to_the_validation_count_and_trace_is_top1(
    finished_run, tiny_dataset
):
    out, summary = finished_run
    doc = read(out, "eval.json")
    manifest = json.load(open(os.path.join(tiny_dataset, "manifest.json")))
    m = np.array([r["row"] for r in doc["confusionMatrix"]["rows"]])
    assert m.sum() == doc["images"] == manifest["splits"]["val"]["count"] == 24
    assert np.trace(m) / m.sum() == pytest.approx(doc["top1"], abs=1e-6)
    assert doc["top1"] == pytest.approx(summary["val_top1"], abs=1e-4)  # the exported model
    assert [c["class"] for c in doc["per_class"]] == summary["classes"]
    assert [c["count"] for c in doc["per_class"]] == m.sum(1).tolist()
    assert 0 <= doc["ece"] <= 1 and sum(doc["calibration"]["count"]) == 24
    val_files = set(open(os.path.join(tiny_dataset, "val", "files.txt")).read().splitlines())
    assert manifest["splits"]["val"]["files"] == "val/files.txt"
    for mistake in doc["worst_mistakes"]:  # every mistake names its image file
        assert mistake["id"] in val_files and mistake["true"] != mistake["predicted"]


def test_evaluate_command_writes_the_same_document(finished_run, tiny_dataset, tmp_path):
    out, _ = finished_run
    target = str(tmp_path / "eval.json")
    result = subprocess.run(
        [sys.executable, "-m", "job.cli", "evaluate", "--data", tiny_dataset, "--model", out,
         "--format", "json", "--output", target],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.load(open(target))
    in_run = read(out, "eval.json")
    assert printed["confusionMatrix"] == in_run["confusionMatrix"]
    assert printed["worst_mistakes"] == in_run["worst_mistakes"]


def test_history_csv_has_one_row_per_epoch(finished_run):
    out, summary = finished_run
    rows = list(csv.DictReader(open(os.path.join(out, "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, h in zip(rows, summary["history"], strict=True):
        assert float(row["train_loss"]) == h["train_loss"] and float(row["lr"]) == h["lr"] > 0


def test_report_is_self_contained(finished_run):
    out, summary = finished_run
    page = open(os.path.join(out, "report.html")).read()
    sources = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(sources) >= 3 + len(read(out, "eval.json")["worst_mistakes"])
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from anywhere
    assert "<link" not in page and "<script" not in page
    for heading in ("Learning curves", "Confusion matrix", "Per class", "Worst mistakes",
                    "Timing", "Config"):  # fmt: skip
        assert heading in page
    for name in summary["classes"]:
        assert f'<td class="l">{name}</td>' in page


@pytest.mark.slow
def test_export_onnx_command_for_an_older_run(finished_run, tmp_path, launch_env):
    out, _ = finished_run
    old = str(tmp_path / "old")
    os.makedirs(old)
    for name in ("summary.json", "model-symbol.json", "model-0000.params"):
        shutil.copy(os.path.join(out, name), old)
    result = subprocess.run(
        [sys.executable, "-m", "job.cli", "export", "--onnx", old, "--triton-model-name", "old"],
        capture_output=True, text=True, timeout=300, env=launch_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "max_abs_diff=" in result.stdout and "top1_agreement=1.0" in result.stdout
    assert sorted(os.listdir(old)) == sorted(
        ["summary.json", "model-symbol.json", "model-0000.params", "model.onnx", "triton"]
    )
    assert os.listdir(os.path.join(old, "triton")) == ["old"]


def test_export_onnx_of_a_folder_that_is_no_run_is_one_line(tmp_path, launch_env):
    result = subprocess.run(
        [sys.executable, "-m", "job.cli", "export", "--onnx", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=launch_env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"finetune-job: error: --model {tmp_path}: not a finished training run "
        f"({tmp_path}/summary.json: No such file or directory)"
    ]


def test_best_epoch_ties_go_to_the_later_epoch():
    history = [{"epoch": 1, "val_top1": 0.5}, {"epoch": 2, "val_top1": 0.9},
               {"epoch": 3, "val_top1": 0.9}, {"epoch": 4, "val_top1": 0.4}]  # fmt: skip
    assert export.best_epoch(history) == 3
    assert export.best_epoch([{"epoch": 1}]) is None


@pytest.mark.slow
@pytest.mark.parametrize(("export", "epoch"), [("best", 3), ("last", 4)])
def test_the_chosen_epoch_is_exported_and_judged(
    tiny_dataset, tmp_path, monkeypatch, export, epoch, make_config
):
    """Validation top-1 is fixed per epoch (0.5, 0.9, 0.9, 0.4) so the choice is known; the
    exported parameters must be those the run checkpointed after that epoch."""
    scores = iter([0.5, 0.9, 0.9, 0.4])
    monkeypatch.setattr(loop.Run, "evaluate", lambda self: {"val_top1": next(scores)})
    out = str(tmp_path / "run")
    summary = lifecycle.run(
        make_config(tiny_dataset, out, epochs=4, keep_checkpoints=4, export=export, onnx=False)
    )
    assert summary["exported_epoch"] == epoch
    assert summary["val_top1"] == [0.5, 0.9, 0.9, 0.4][epoch - 1]
    assert summary["last_val_top1"] == 0.4
    step = epoch * 12  # 12 steps an epoch
    (folder,) = glob.glob(os.path.join(out, "checkpoints", f"step-{step:08d}-*"))
    saved = mx.nd.load(os.path.join(folder, "model.params"))
    exported = mx.nd.load(os.path.join(out, "model.params"))
    for key in saved:
        np.testing.assert_array_equal(saved[key].asnumpy(), exported[key].asnumpy(), key)
    # The gate judges the exported model: its eval.json is that model's accuracy.
    doc = read(out, "eval.json")
    again = evaluate_export(tiny_dataset, out, Storage())
    assert doc["top1"] == again["top1"]


def test_triton_config_tensors_are_the_onnx_model_tensors(finished_run):
    from google.protobuf import text_format

    from .test_onnx_export import model_config_message

    pb = model_config_message()
    out, _ = finished_run
    for name in ("finetune", "finetune_uint8"):
        folder = os.path.join(out, "triton", name)
        text = open(os.path.join(folder, "config.pbtxt")).read()
        config = text_format.Parse(text, pb.ModelConfig())
        graph = onnx.load(os.path.join(folder, "1", "model.onnx")).graph
        for declared, actual in ((config.input[0], graph.input[0]),
                                 (config.output[0], graph.output[0])):  # fmt: skip
            dims = [d.dim_param or d.dim_value for d in actual.type.tensor_type.shape.dim]
            assert declared.name == actual.name
            assert dims == ["batch", *declared.dims]  # Triton's dims leave out the batch
