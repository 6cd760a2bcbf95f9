"""`finetune-job predict` on a real run's exported model: files, folders, datasets, S3."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from job.errors import InputError
from job.outputs import predict
from job.storage import S3Settings, Storage


def lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("engine", ["mxnet", "onnx"])
def test_top1_on_the_validation_images_equals_evaluate(
    finished_run, tiny_dataset, tmp_path, engine
):
    out, _ = finished_run
    target = str(tmp_path / "val.jsonl")
    n = predict.predict(out, [tiny_dataset], Storage(), output=target, engine=engine, top_k=3)
    rows = lines(target)
    assert n == len(rows) == 24
    doc = json.load(open(os.path.join(out, "eval.json")))
    # evaluate's confusion matrix rows are true classes: recover each image's true class from
    # its file name (class/NNNN.jpg) and compare predicted classes image by image.
    m = np.zeros((3, 3), int)
    classes = [s["displayName"] for s in doc["confusionMatrix"]["annotationSpecs"]]
    for row in rows:
        true = row["uri"].split("#val/", 1)[1].split("/")[0]
        m[classes.index(true), row["top"][0]["index"]] += 1
        probs = [t["prob"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 3
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert m.tolist() == [r["row"] for r in doc["confusionMatrix"]["rows"]]


def test_files_and_folders_recursively_with_an_unreadable_image(
    finished_run, shape_images, tmp_path
):
    out, summary = finished_run
    folder = tmp_path / "photos"
    shutil.copytree(shape_images, folder / "nested")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    single = os.path.join(shape_images, "circle", "0000.jpg")
    target = str(tmp_path / "p.jsonl")
    n = predict.predict(out, [str(folder), single], Storage(), output=target, top_k=1,
                        batch_size=16)  # fmt: skip
    rows = lines(target)
    assert n == len(rows) == 1 + 120 + 1
    errors = [r for r in rows if "error" in r]
    assert [e["uri"] for e in errors] == [str(folder / "broken.jpg")]
    assert errors[0]["error"] == "not a readable image" and "top" not in errors[0]
    good = [r for r in rows if "top" in r]
    assert {r["top"][0]["label"] for r in good} <= set(summary["classes"])
    assert good[-1]["uri"] == single


def test_five_crop_tta_on_a_file_returns_a_distribution(finished_run, tmp_path):
    out, _ = finished_run
    img = str(tmp_path / "img.jpg")
    import cv2

    cv2.imwrite(img, np.full((50, 60, 3), 200, np.uint8))
    plain = predict.predict(out, [img], Storage(), output=str(tmp_path / "a.jsonl"))
    tta = predict.predict(out, [img], Storage(), output=str(tmp_path / "b.jsonl"), tta=True)
    assert plain == tta == 1
    row = lines(str(tmp_path / "b.jsonl"))[0]
    assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-4)


def test_csv_output(finished_run, shape_images, tmp_path):
    out, _ = finished_run
    target = str(tmp_path / "p.csv")
    predict.predict(out, [os.path.join(shape_images, "cross")], Storage(), output=target,
                    fmt="csv", top_k=2)  # fmt: skip
    rows = list(csv.DictReader(open(target)))
    assert len(rows) == 40
    assert list(rows[0]) == ["uri", "label_1", "index_1", "prob_1", "label_2", "index_2",
                             "prob_2", "error"]  # fmt: skip
    assert float(rows[0]["prob_1"]) >= float(rows[0]["prob_2"])


def test_a_missing_source_fails_before_anything_is_written(finished_run, tmp_path):
    out, _ = finished_run
    target = tmp_path / "p.jsonl"
    with pytest.raises(InputError, match=r"predict: .*nowhere: no images, folder or dataset"):
        predict.predict(out, [str(tmp_path / "nowhere")], Storage(), output=str(target))
    assert not target.exists()


def test_s3_sources_and_output_appear_only_when_complete(
    finished_run, shape_images, s3_server, s3_bucket, s3_client, monkeypatch
):
    out, _ = finished_run
    storage = Storage(S3Settings(endpoint_url=s3_server))
    for name in ("0000.jpg", "0001.jpg", "0002.jpg"):
        storage.upload(os.path.join(shape_images, "triangle", name), f"{s3_bucket}/in/t/{name}")
    target = f"{s3_bucket}/out/p.jsonl"
    uploads = []
    real_upload = Storage.upload

    def watch(self, local, uri):  # the output is one upload of the finished file
        uploads.append((uri, sum(1 for _ in open(local))))
        real_upload(self, local, uri)

    monkeypatch.setattr(Storage, "upload", watch)
    n = predict.predict(out, [f"{s3_bucket}/in/"], storage, output=target, engine="onnx")
    assert n == 3 and uploads == [(target, 3)]
    rows = [json.loads(x) for x in storage.read_bytes(target).decode().splitlines()]
    assert [r["uri"] for r in rows] == [f"{s3_bucket}/in/t/000{i}.jpg" for i in range(3)]


def test_command_line_writes_jsonl_to_stdout(finished_run, shape_images, launch_env):
    out, _ = finished_run
    result = subprocess.run(
        [sys.executable, "-m", "job.cli", "predict", "--model", out, "--top-k", "1",
         os.path.join(shape_images, "circle", "0003.jpg")],
        capture_output=True, text=True, timeout=300, env=launch_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert row["uri"].endswith("circle/0003.jpg") and len(row["top"]) == 1
