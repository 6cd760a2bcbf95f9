"""``--metrics-file``: the run's metrics in the shape Kubeflow Pipelines v2 artifacts hold.

One JSON document, written by rank 0 at the end of the run, atomically (a local file is
renamed into place; an S3 PUT is atomic), through job/storage.py::

    {
      "metrics": {"val_top1": 0.91, "best_val_top1": 0.92, "train_loss": 0.31, ...},
      "classification_metrics": {
        "confusionMatrix": {
          "annotationSpecs": [{"displayName": "cat"}, {"displayName": "dog"}],
          "rows": [{"row": [40, 2]}, {"row": [3, 45]}]
        }
      }
    }

``metrics`` is the metadata of a KFP ``Metrics`` artifact (flat name → number);
``classification_metrics`` is the metadata of a ``ClassificationMetrics`` artifact (what its
``log_confusion_matrix(categories, matrix)`` stores), present only when the run's evaluation
gave a confusion matrix: ``summary["confusion_matrix"]``, rows the true class and columns the
predicted one, in ``summary["classes"]`` order. examples/kfp_pipeline.py copies both into the
component's output artifacts.
"""

from __future__ import annotations

import json
import math
from typing import Any

from job.storage import Storage

# Summary keys that are numbers worth comparing across runs, and the last epoch's record keys.
SUMMARY_KEYS = (
    "val_top1",
    "val_top5",
    "val_top1_tta",
    "best_val_top1",
    "train_images_per_second",
    "wall_seconds",
    "epochs",
    "workers",
    "global_batch_size",
    "corrupt_records",
)
LAST_EPOCH_KEYS = ("train_loss", "train_top1", "val_top5")


def build(summary: dict[str, Any]) -> dict[str, Any]:
    """The metrics document of a run's summary (see the module docstring)."""
    last = (summary.get("history") or [{}])[-1]
    metrics: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        _put(metrics, key, summary.get(key))
    for key in LAST_EPOCH_KEYS:
        if key not in metrics:
            _put(metrics, key, last.get(key))
    doc: dict[str, Any] = {"metrics": metrics}
    matrix = summary.get("confusion_matrix")
    if matrix is not None:
        doc["classification_metrics"] = {
            "confusionMatrix": confusion_matrix(list(summary["classes"]), matrix)
        }
    return doc


def confusion_matrix(categories: list[str], matrix: list[list[Any]]) -> dict[str, Any]:
    """KFP's confusion-matrix struct; a matrix that does not match the classes is a bug."""
    if len(matrix) != len(categories) or any(len(row) != len(categories) for row in matrix):
        raise ValueError(
            f"confusion matrix is {len(matrix)} rows for {len(categories)} classes; "
            "it must be square over the classes"
        )
    return {
        "annotationSpecs": [{"displayName": c} for c in categories],
        "rows": [{"row": [int(v) for v in row]} for row in matrix],
    }


def write(uri: str, summary: dict[str, Any], storage: Storage) -> dict[str, Any]:
    doc = build(summary)
    storage.write_bytes(uri, json.dumps(doc, indent=1, sort_keys=True).encode())
    return doc


def _put(metrics: dict[str, float], key: str, value: Any) -> None:
    # KFP metrics are numbers; a missing value (no validation split) or NaN is left out
    # rather than written as null, which the KFP UI cannot show.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if math.isfinite(value):
        metrics[key] = value


def to_kfp(doc: dict[str, Any], metrics: Any, classification: Any | None = None) -> None:
    """Log a metrics document into KFP v2 output artifacts (``kfp.dsl.Metrics`` and
    ``ClassificationMetrics``), through their own ``log_*`` methods; kfp is not imported here,
    so the training image needs it only inside a pipeline component."""
    for name, value in doc["metrics"].items():
        metrics.log_metric(name, value)
    matrix = doc.get("classification_metrics", {}).get("confusionMatrix")
    if classification is not None and matrix is not None:
        classification.log_confusion_matrix(
            [spec["displayName"] for spec in matrix["annotationSpecs"]],
            [row["row"] for row in matrix["rows"]],
        )
