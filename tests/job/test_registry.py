"""Run names, the gate and the latest pointer, on local directories."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import pytest

from job.errors import GateError, InputError
from job.exitcodes import ExitCode
from job.outputs import registry
from job.storage import Storage


def write_run(root: Path, run: str, val_top1: float) -> None:
    out = root / "runs" / run
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"val_top1": val_top1, "epochs": 2}))


@pytest.mark.parametrize(
    ("gate", "accuracy", "latest", "passes"),
    [
        (registry.Gate(), 0.1, None, True),
        (registry.Gate(min_accuracy=0.9), 0.91, None, True),
        (registry.Gate(min_accuracy=0.9), 0.9, None, True),
        (registry.Gate(min_accuracy=0.9), 0.89, None, False),
        (registry.Gate(not_worse=True), 0.80, 0.85, False),
        (registry.Gate(not_worse=True), 0.85, 0.85, True),
        (registry.Gate(not_worse=True), 0.80, None, True),
        (registry.Gate(min_accuracy=0.5, not_worse=True), 0.6, 0.7, False),
    ],
    ids=[
        "no-gate",
        "above-min",
        "at-min",
        "below-min",
        "worse-than-latest",
        "equal-to-latest",
        "no-latest-yet",
        "min-ok-but-worse",
    ],
)
def test_gate(gate, accuracy, latest, passes):
    assert (gate.rejects(accuracy, latest) is None) is passes


def test_a_passing_run_becomes_latest_and_resolves(tmp_path):
    storage = Storage()
    write_run(tmp_path, "r1", 0.8)
    summary, pointer = registry.finish_run(storage, str(tmp_path), "r1", registry.Gate(0.5))
    assert summary["val_top1"] == 0.8
    model = str(tmp_path / "runs" / "r1" / "model.params")
    assert pointer == {"run": "r1", "model": model, "val_top1": 0.8}
    assert json.loads((tmp_path / "latest").read_text()) == pointer
    assert registry.resolve_pretrained(str(tmp_path / "latest"), storage) == model


def test_a_worse_run_leaves_latest_alone(tmp_path):
    storage = Storage()
    write_run(tmp_path, "r1", 0.8)
    registry.finish_run(storage, str(tmp_path), "r1", registry.Gate())
    write_run(tmp_path, "r2", 0.7)
    with pytest.raises(
        GateError, match="run r2: val_top1 0.7000 is worse than latest's 0.8000"
    ) as info:
        registry.finish_run(storage, str(tmp_path), "r2", registry.Gate(not_worse=True))
    assert info.value.summary == {"val_top1": 0.7, "epochs": 2}
    assert json.loads((tmp_path / "latest").read_text())["run"] == "r1"


@pytest.mark.parametrize(
    ("summary", "match"),
    [
        (None, "wrote no summary.json"),
        ({"val_top1": "high"}, "no numeric 'val_top1'"),
        ({"loss": 0.1}, "no numeric 'val_top1'"),
    ],
    ids=["missing", "not-a-number", "no-metric"],
)
def test_bad_summaries_fail_the_gate(tmp_path, summary, match):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    if summary is not None:
        (tmp_path / "runs" / "r1" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(GateError, match=match):
        registry.finish_run(Storage(), str(tmp_path), "r1", registry.Gate())
    assert not (tmp_path / "latest").exists()


def test_a_summary_that_is_not_json_fails_the_gate(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "summary.json").write_text("{cut short")
    with pytest.raises(GateError, match=r"summary.json .*summary.json is not valid JSON"):
        registry.finish_run(Storage(), str(tmp_path), "r1", registry.Gate())
    assert not (tmp_path / "latest").exists()


@pytest.mark.parametrize(
    ("uri", "if_missing", "expected"),
    [
        ("s3://b/model.params", None, "s3://b/model.params"),
        ("zoo", None, "zoo"),
        ("{root}/latest", "zoo", "zoo"),
    ],
    ids=["plain-uri", "zoo", "missing-latest-falls-back"],
)
def test_resolve_pretrained_passthrough(tmp_path, uri, if_missing, expected):
    uri = uri.format(root=tmp_path)
    assert registry.resolve_pretrained(uri, Storage(), if_missing=if_missing) == expected


def test_resolve_missing_latest_names_it(tmp_path):
    with pytest.raises(InputError, match=f"pretrained {tmp_path}/latest: no run has passed"):
        registry.resolve_pretrained(f"{tmp_path}/latest", Storage())


def test_resolve_bad_pointer(tmp_path):
    (tmp_path / "latest").write_text("{not json")
    with pytest.raises(InputError, match="latest pointer .* is not valid JSON"):
        registry.resolve_pretrained(f"{tmp_path}/latest", Storage())


def test_run_output_layout():
    assert registry.run_output("s3://b/flowers", "r1") == "s3://b/flowers/runs/r1"
    assert registry.is_latest_uri("s3://b/flowers/latest/")
    assert not registry.is_latest_uri("s3://b/latest-model.params")


NOW = dt.datetime(2024, 6, 1, 3, 0, 5, tzinfo=dt.UTC)
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


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
    name = registry.run_name(prefix, NOW, random.Random(1))
    assert name.startswith(expected_start)
    assert len(name) <= registry.MAX_RUN_NAME
    # Room for the MPI Operator's longest derived pod name, a DNS label that starts with a letter.
    longest = f"{name}-worker-9999"
    assert DNS_LABEL.match(longest) and len(longest) <= 63


def test_run_names_differ_within_one_second():
    names = {registry.run_name("ft", NOW) for _ in range(50)}
    assert len(names) == 50


def set_latest(storage: Storage, root: Path, run: str, accuracy: float) -> None:
    """Point latest at ``run``, whatever it points at now."""
    _, version = storage.read_versioned(str(root / "latest"))
    assert registry.promote(storage, str(root), run, accuracy, version) is not None


def write_eval(root: Path, run: str, recalls: dict[str, float]) -> None:
    per_class = [{"class": c, "count": 10, "recall": r} for c, r in recalls.items()]
    (root / "runs" / run / "eval.json").write_text(json.dumps({"per_class": per_class}))


def test_a_run_that_gains_overall_but_loses_one_class_leaves_latest_alone(tmp_path):
    storage = Storage()
    write_run(tmp_path, "r1", 0.80)
    write_eval(tmp_path, "r1", {"cat": 0.9, "dog": 0.7, "fox": 0.8})
    registry.finish_run(storage, str(tmp_path), "r1", registry.Gate())
    write_run(tmp_path, "r2", 0.85)
    write_eval(tmp_path, "r2", {"cat": 0.65, "dog": 0.95, "fox": 0.95})
    gate = registry.Gate(not_worse=True, max_class_drop=0.2)
    with pytest.raises(
        GateError,
        match=r"run r2: recall dropped by more than --max-class-drop 0.2 vs r1: "
        r"cat 0.900 -> 0.650; .*latest left unchanged",
    ):
        registry.finish_run(storage, str(tmp_path), "r2", gate)
    assert json.loads((tmp_path / "latest").read_text())["run"] == "r1"
    # A wider limit, or the per-class gate off, lets the same run through.
    for passing in (registry.Gate(max_class_drop=0.3), registry.Gate(not_worse=True)):
        assert registry.finish_run(storage, str(tmp_path), "r2", passing)[1]["run"] == "r2"
        set_latest(storage, tmp_path, "r1", 0.8)


def test_the_per_class_gate_is_off_without_eval_files(tmp_path):
    storage = Storage()
    write_run(tmp_path, "r1", 0.8)
    registry.finish_run(storage, str(tmp_path), "r1", registry.Gate())
    write_run(tmp_path, "r2", 0.8)
    write_eval(tmp_path, "r2", {"cat": 0.0})
    gate = registry.Gate(max_class_drop=0.01)
    assert registry.finish_run(storage, str(tmp_path), "r2", gate)[1]["run"] == "r2"


def every_image_with_every_label(dataset: str, dest: Path) -> str:
    """A copy of ``dataset`` whose validation split holds each image once per class label:
    any model predicts one class per image, so the recalls of the classes sum to exactly 1
    and at least one class's recall is at most 1/3 (3 classes)."""
    import hashlib
    import shutil

    from mxnet import recordio

    shutil.copytree(dataset, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    jpegs = []
    for shard in manifest["splits"]["val"]["shards"]:
        rec = recordio.MXIndexedRecordIO(str(dest / shard["idx"]), str(dest / shard["rec"]), "r")
        jpegs += [recordio.unpack(rec.read_idx(k))[1] for k in sorted(rec.keys)]
        rec.close()
    rec_path, idx_path = dest / "val" / "all.rec", dest / "val" / "all.idx"
    writer = recordio.MXIndexedRecordIO(str(idx_path), str(rec_path), "w")
    files = []
    for label, name in enumerate(manifest["classes"]):
        for k, jpeg in enumerate(jpegs):
            header = recordio.IRHeader(0, float(label), len(files), 0)
            writer.write_idx(len(files), recordio.pack(header, jpeg))
            files.append(f"{name}/copy-{k}.jpg")
    writer.close()
    digest = hashlib.sha256(rec_path.read_bytes()).hexdigest()
    shard = {"rec": "val/all.rec", "idx": "val/all.idx", "count": len(files),
             "bytes": rec_path.stat().st_size, "sha256": digest}  # fmt: skip
    (dest / "val" / "files.txt").write_text("".join(f + "\n" for f in files))
    manifest["splits"]["val"] = {"count": len(files), "shards": [shard], "files": "val/files.txt"}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return str(dest)


@pytest.mark.slow
def test_a_real_run_that_loses_a_class_past_the_limit_is_not_promoted(
    tiny_dataset, tmp_path, make_config
):
    from job.training import lifecycle

    data = every_image_with_every_label(tiny_dataset, tmp_path / "ds")
    root = tmp_path / "root"
    lifecycle.run(make_config(data, root / "runs" / "r2", epochs=1, onnx=False))
    doc = json.loads((root / "runs" / "r2" / "eval.json").read_text())
    recalls = [c["recall"] for c in doc["per_class"]]
    assert sum(recalls) == pytest.approx(1.0, abs=1e-5) and min(recalls) <= 1 / 3 + 1e-5
    # The current latest: a run that got every class right.
    write_run(root, "r1", 0.1)
    write_eval(root, "r1", {c["class"]: 1.0 for c in doc["per_class"]})
    set_latest(Storage(), root, "r1", 0.1)
    before = (root / "latest").read_bytes()
    with pytest.raises(GateError, match="recall dropped by more than --max-class-drop 0.6") as e:
        registry.finish_run(Storage(), str(root), "r2", registry.Gate(max_class_drop=0.6))
    assert e.value.exit_code == ExitCode.GATE_REFUSED
    assert (root / "latest").read_bytes() == before
