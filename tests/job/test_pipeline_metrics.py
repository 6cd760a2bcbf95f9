"""--metrics-file: Kubeflow Pipelines metrics of a run's summary, written atomically on local
paths and S3."""

from __future__ import annotations

import json

import pytest

from job.outputs import pipeline_metrics
from job.storage import Storage

SUMMARY = {
    "classes": ["cat", "dog"],
    "epochs": 2,
    "workers": 2,
    "global_batch_size": 64,
    "val_top1": 0.9,
    "best_val_top1": 0.92,
    "train_images_per_second": 410.5,
    "wall_seconds": 100.0,
    "corrupt_records": 0,
    "history": [
        {"epoch": 1, "train_loss": 0.9, "train_top1": 0.6, "val_top1": 0.8},
        {"epoch": 2, "train_loss": float("nan"), "train_top1": 0.8, "val_top1": 0.9},
    ],
}


def test_flat_metrics_are_numbers_and_skip_missing_or_nan():
    doc = pipeline_metrics.build(SUMMARY)
    assert doc["metrics"] == {
        "val_top1": 0.9,
        "best_val_top1": 0.92,
        "train_images_per_second": 410.5,
        "wall_seconds": 100.0,
        "epochs": 2,
        "workers": 2,
        "global_batch_size": 64,
        "corrupt_records": 0,
        "train_top1": 0.8,
    }
    assert "classification_metrics" not in doc


def test_confusion_matrix_in_kfp_shape():
    doc = pipeline_metrics.build({**SUMMARY, "confusion_matrix": [[40, 2], [3, 45]]})
    assert doc["classification_metrics"] == {
        "confusionMatrix": {
            "annotationSpecs": [{"displayName": "cat"}, {"displayName": "dog"}],
            "rows": [{"row": [40, 2]}, {"row": [3, 45]}],
        }
    }


def test_a_matrix_that_does_not_fit_the_classes_is_refused():
    with pytest.raises(ValueError, match="2 classes"):
        pipeline_metrics.build({**SUMMARY, "confusion_matrix": [[1, 2, 3]]})


def test_written_locally_without_a_partial_file(tmp_path):
    target = tmp_path / "kfp" / "metrics.json"
    doc = pipeline_metrics.write(str(target), SUMMARY, Storage())
    assert json.loads(target.read_text()) == doc
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_written_to_s3(s3_server, s3_bucket):
    from job.storage import S3Settings

    storage = Storage(S3Settings(endpoint_url=s3_server))
    uri = f"{s3_bucket}/kfp/metrics.json"
    doc = pipeline_metrics.write(uri, SUMMARY, storage)
    assert json.loads(storage.read_bytes(uri)) == doc
