"""eval.json from constructed predictions, and the per-class rule of the promotion gate."""

import json

import numpy as np
import pytest

from job.outputs import evaluation, registry

NAMES = ["cat", "dog", "fox"]


def probs(rows):
    return np.array(rows, dtype=np.float64)


def constructed():
    # true:      cat  cat  cat  dog  dog  fox
    # predicted: cat  dog  cat  dog  dog  cat
    prob = probs(
        [
            [0.9, 0.05, 0.05],
            [0.3, 0.6, 0.1],
            [0.5, 0.3, 0.2],
            [0.1, 0.8, 0.1],
            [0.2, 0.7, 0.1],
            [0.95, 0.01, 0.04],
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 2])
    ids = [f"img{i}.jpg" for i in range(6)]
    return prob, labels, ids


def test_confusion_matrix_per_class_numbers_and_kfp_shape():
    doc = evaluation.summarize(*constructed(), NAMES, worst=10)
    rows = [r["row"] for r in doc["confusionMatrix"]["rows"]]
    assert rows == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert [s["displayName"] for s in doc["confusionMatrix"]["annotationSpecs"]] == NAMES
    cat, dog, fox = doc["per_class"]
    approx = lambda x: pytest.approx(x, abs=1e-6)  # noqa: E731 - rounded to 6 places
    assert (cat["count"], cat["precision"], cat["recall"]) == (3, approx(2 / 3), approx(2 / 3))
    assert (dog["precision"], dog["recall"]) == (approx(2 / 3), 1.0)
    assert dog["f1"] == approx(2 * (2 / 3) / (2 / 3 + 1))
    assert (fox["count"], fox["precision"], fox["recall"], fox["f1"]) == (1, 0.0, 0.0, 0.0)
    assert doc["images"] == 6 and doc["top1"] == pytest.approx(4 / 6, abs=1e-6)
    assert doc["top5_k"] == 3 and doc["top5"] == 1.0
    json.dumps(doc)  # plain JSON types only


def test_matrix_sums_to_the_count_and_its_trace_is_top1():
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(7), size=500)
    labels = rng.integers(0, 7, 500)
    doc = evaluation.summarize(prob, labels, [str(i) for i in range(500)], list("abcdefg"))
    m = np.array([r["row"] for r in doc["confusionMatrix"]["rows"]])
    assert m.sum() == 500 == doc["images"]
    assert np.trace(m) / m.sum() == pytest.approx(doc["top1"], abs=1e-6)
    assert doc["top1"] == pytest.approx((prob.argmax(1) == labels).mean(), abs=1e-6)
    top5 = (np.argsort(-prob, 1)[:, :5] == labels[:, None]).any(1).mean()
    assert doc["top5"] == pytest.approx(top5, abs=1e-6)
    assert sum(doc["calibration"]["count"]) == 500 and doc["calibration"]["bins"] == 15


def test_expected_calibration_error_by_hand():
    # Two bins used: confidence 0.95 (bin 15) right 1 of 2; confidence 0.55 (bin 9) right 2 of 2.
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    out = evaluation.calibration(confidence, correct)
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.55)) / 4
    assert out["ece"] == pytest.approx(expected, abs=1e-6)
    assert out["calibration"]["count"][14] == 2 and out["calibration"]["count"][8] == 2
    assert out["calibration"]["accuracy"][14] == 0.5


def test_perfectly_calibrated_predictions_have_zero_ece():
    confidence = np.full(10, 0.7)
    correct = np.array([True] * 7 + [False] * 3)
    assert evaluation.calibration(confidence, correct)["ece"] == pytest.approx(0.0, abs=1e-9)


def test_worst_mistakes_are_the_most_confident_errors_first():
    doc = evaluation.summarize(*constructed(), NAMES, worst=2)
    assert [(w["id"], w["true"], w["predicted"]) for w in doc["worst_mistakes"]] == [
        ("img5.jpg", "fox", "cat"),
        ("img1.jpg", "cat", "dog"),
    ]
    assert doc["worst_mistakes"][0]["confidence"] == 0.95


def per_class(recalls, counts=None):
    counts = counts or [10] * len(recalls)
    return {
        "per_class": [
            {"class": n, "recall": r, "count": c}
            for n, r, c in zip(NAMES, recalls, counts, strict=False)
        ]
    }


@pytest.mark.parametrize(
    ("old", "new", "limit", "dropped"),
    [
        ([0.9, 0.9, 0.9], [0.95, 0.7, 0.9], 0.1, ["dog"]),
        ([0.9, 0.9, 0.9], [0.95, 0.8, 0.9], 0.1, []),  # exactly the limit passes
        ([0.9, 0.9, 0.9], [0.5, 0.5, 0.99], 0.3, ["cat", "dog"]),
        ([0.9, 0.9], [0.9, 0.9, 0.1], 0.05, []),  # a new class cannot have dropped
    ],
    ids=["one-class", "at-limit", "two-classes", "new-class"],
)
def test_recall_drops(old, new, limit, dropped):
    drops = registry.recall_drops(per_class(new), per_class(old), limit)
    assert [c for c, _, _ in drops] == dropped


def test_a_class_without_images_before_cannot_have_dropped():
    old = per_class([0.0, 0.9, 0.9], counts=[0, 10, 10])
    assert registry.recall_drops(per_class([0.0, 0.9, 0.9]), old, 0.01) == []
