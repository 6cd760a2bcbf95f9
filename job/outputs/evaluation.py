"""Per-class evaluation: what ``eval.json`` holds, and the per-class promotion rule.

Pure functions of the predictions (softmax rows, true labels, image names): no MXNet, no
storage, so the gate and the tests call them on constructed data.

``eval.json``::

    images, top1, top5            counts and accuracies (top5: top-min(5, classes))
    per_class                     [{class, index, count, precision, recall, f1}]
    confusionMatrix               Kubeflow Pipelines' ClassificationMetrics shape: rows are
                                  true classes, columns predicted ones
    ece, calibration              expected calibration error over 15 equal-width confidence
                                  bins, and the bins (for a reliability diagram)
    worst_mistakes                the k wrong predictions made with the highest confidence
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return m


def per_class(m: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Count, precision, recall and F1 of every class (0 where undefined)."""
    rows = []
    for i, name in enumerate(names):
        hit, count, called = int(m[i, i]), int(m[i].sum()), int(m[:, i].sum())
        precision = hit / called if called else 0.0
        recall = hit / count if count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "index": i,
                "count": count,
                "precision": round(precision, 6),
                "recall": round(recall, 6),
                "f1": round(f1, 6),
            }
        )
    return rows


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Equal-width confidence bins: mean confidence, accuracy and count of each, and the
    expected calibration error (their gap weighted by the bin's share of images)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    hit_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    nonzero = np.maximum(count, 1)
    mean_conf, accuracy = conf_sum / nonzero, hit_sum / nonzero
    ece = float(np.sum(np.abs(accuracy - mean_conf) * count) / max(len(confidence), 1))
    return {
        "ece": round(ece, 6),
        "calibration": {
            "bins": bins,
            "confidence": [round(float(c), 6) for c in mean_conf],
            "accuracy": [round(float(a), 6) for a in accuracy],
            "count": [int(c) for c in count],
        },
    }


def kfp_confusion_matrix(m: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The matrix as Kubeflow Pipelines' ClassificationMetrics writes it."""
    return {
        "annotationSpecs": [{"displayName": n} for n in names],
        "rows": [{"row": [int(v) for v in row]} for row in m],
    }


def worst_mistakes(
    prob: np.ndarray, labels: np.ndarray, ids: list[str], names: list[str], k: int
) -> list[dict[str, Any]]:
    """The ``k`` wrong predictions with the highest confidence, most confident first."""
    predicted = prob.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-prob[wrong, predicted[wrong]], kind="stable")][:k]
    return [
        {
            "id": ids[i],
            "true": names[int(labels[i])],
            "predicted": names[int(predicted[i])],
            "confidence": round(float(prob[i, predicted[i]]), 6),
            "true_prob": round(float(prob[i, int(labels[i])]), 6),
        }
        for i in order
    ]


def summarize(
    prob: np.ndarray, labels: np.ndarray, ids: list[str], names: list[str], worst: int = 16
) -> dict[str, Any]:
    """The ``eval.json`` document of softmax rows ``prob`` (N × classes)."""
    labels = labels.astype(np.int64)
    n, classes = prob.shape
    predicted = prob.argmax(1)
    m = confusion(labels, predicted, classes)
    top = min(5, classes)
    in_top = (np.argsort(-prob, axis=1)[:, :top] == labels[:, None]).any(1)
    doc: dict[str, Any] = {
        "images": int(n),
        "top1": round(float(np.trace(m)) / max(n, 1), 6),
        "top5": round(float(in_top.mean()) if n else 0.0, 6),
        "top5_k": top,
        "per_class": per_class(m, names),
        "confusionMatrix": kfp_confusion_matrix(m, names),
    }
    doc.update(calibration(prob.max(1) if n else np.zeros(0), predicted == labels))
    doc["worst_mistakes"] = worst_mistakes(prob, labels, ids, names, worst)
    return doc
