"""``OUTPUT/report.html``: one self-contained page about a run.

Learning curves, the confusion matrix, a per-class table, a reliability diagram, the worst
mistakes with thumbnails, the ONNX check, and the run's config and timing. Charts are drawn
with matplotlib's Agg backend and embedded as PNG data URIs (thumbnails as JPEG data URIs):
the file references nothing outside itself, so it opens from S3, a mail or a CI artefact.

``comparison_html`` draws several runs' curves on one set of axes (``make demo``: fine-tuned
vs from scratch).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
max-width:1100px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.muted{color:#777;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:10px}.grid figure{margin:0;width:132px;font-size:12px}
.grid img{width:128px;height:128px;object-fit:cover;border:2px solid #c33;image-rendering:pixelated}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}img.chart{max-width:100%}
"""


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def curves_chart(runs: Mapping[str, list[dict[str, Any]]]) -> str:
    """Train loss, validation top-1 and learning rate per epoch, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (("train_loss", "train loss"), ("val_top1", "validation top-1"), ("lr", "lr"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, history in runs.items():
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[1].legend()
    return _figure_uri(fig)


def confusion_chart(doc: dict[str, Any]) -> str:
    plt = _pyplot()
    names = [s["displayName"] for s in doc["confusionMatrix"]["annotationSpecs"]]
    m = np.array([r["row"] for r in doc["confusionMatrix"]["rows"]])
    size = max(3.5, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 30:
        for (i, j), v in np.ndenumerate(m):
            colour = "white" if v > m.max() / 2 else "black"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=colour)
    return _figure_uri(fig)


def reliability_chart(doc: dict[str, Any]) -> str:
    plt = _pyplot()
    cal = doc["calibration"]
    bins = cal["bins"]
    centres = (np.arange(bins) + 0.5) / bins
    fig, ax = plt.subplots(figsize=(4.2, 4))
    has = np.array(cal["count"]) > 0
    ax.bar(centres[has], np.array(cal["accuracy"])[has], width=1 / bins, edgecolor="k",
           alpha=0.7, label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {doc['ece']:.3f} ({bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    return _figure_uri(fig)


def _table(rows: list[list[Any]], header: list[str], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _thumbnail_uri(jpeg: bytes, size: int = 128) -> str | None:
    import cv2

    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


def mistakes_grid(doc: dict[str, Any], images: Mapping[int, bytes]) -> str:
    figures = []
    for row in doc.get("worst_mistakes", []):
        uri = _thumbnail_uri(images[row["record"]]) if row.get("record") in images else None
        img = f'<img src="{uri}" alt="{html.escape(row["id"])}">' if uri else ""
        figures.append(
            f"<figure>{img}<figcaption><b>{html.escape(row['predicted'])}</b> "
            f"{row['confidence']:.2f}<br>true: {html.escape(row['true'])}<br>"
            f'<span class="muted">{html.escape(row["id"])}</span></figcaption></figure>'
        )
    if not figures:
        return '<p class="muted">No mistakes on the validation set.</p>'
    return '<div class="grid">' + "".join(figures) + "</div>"


def run_html(
    summary: dict[str, Any], doc: dict[str, Any] | None, images: Mapping[int, bytes]
) -> str:
    """The report of one run: its summary.json, eval.json and the worst mistakes' images."""
    title = f"finetune-job run: {summary.get('model', '')}, {summary.get('num_classes')} classes"
    parts = [f"<h1>{html.escape(title)}</h1>", _headline(summary, doc)]
    parts += ["<h2>Learning curves</h2>", _img(curves_chart({"run": summary["history"]}))]
    if doc is not None:
        rows = [
            [c["class"], c["count"], c["precision"], c["recall"], c["f1"]] for c in doc["per_class"]
        ]
        parts += [
            "<h2>Confusion matrix and calibration</h2>",
            f'<div class="row">{_img(confusion_chart(doc))}{_img(reliability_chart(doc))}</div>',
            "<h2>Per class</h2>",
            _table(rows, ["class", "images", "precision", "recall", "F1"]),
            f"<h2>Worst mistakes (highest confidence, {len(doc['worst_mistakes'])})</h2>",
            mistakes_grid(doc, images),
        ]
    parts += ["<h2>Timing</h2>", _timing(summary), "<h2>Config</h2>", _config(summary)]
    return _page(title, parts)


def comparison_html(runs: Mapping[str, dict[str, Any]], title: str) -> str:
    """Several runs' curves on one set of axes, and their headline numbers."""
    rows = [
        [label, s.get("exported_epoch"), s.get("val_top1"), s.get("best_val_top1"),
         s.get("train_images_per_second"), s.get("wall_seconds")]
        for label, s in runs.items()
    ]  # fmt: skip
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        _img(curves_chart({label: s["history"] for label, s in runs.items()})),
        _table(rows, ["run", "exported epoch", "val top-1", "best", "img/s", "wall s"]),
    ]
    return _page(title, parts)


def _headline(summary: dict[str, Any], doc: dict[str, Any] | None) -> str:
    items = [
        ("exported epoch", summary.get("exported_epoch")),
        ("val top-1", summary.get("val_top1")),
        ("workers", summary.get("workers")),
        ("pretrained", summary.get("pretrained")),
    ]
    if doc is not None:
        items += [("top-5", doc["top5"]), ("ECE", doc["ece"]), ("val images", doc["images"])]
    onnx = summary.get("onnx")
    if onnx:
        items.append(("ONNX max |diff|", f"{onnx['max_abs_diff']:.2g}"))
    return _table([[k, "" if v is None else v] for k, v in items], ["", ""])


def _timing(summary: dict[str, Any]) -> str:
    rows = [
        [h["epoch"], h.get("seconds"), h.get("train_seconds"), h.get("images_per_second")]
        for h in summary["history"]
    ]
    total = f'<p class="muted">wall {summary.get("wall_seconds")} s in total</p>'
    return total + _table(rows, ["epoch", "seconds", "training s", "img/s"])


def _config(summary: dict[str, Any]) -> str:
    config = summary.get("config", {})
    rows = [[k, json.dumps(v)] for k, v in sorted(config.items())]
    return _table(rows, ["key", "value"], left=2)


def _img(uri: str) -> str:
    return f'<img class="chart" src="{uri}" alt="chart">'


def _page(title: str, parts: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
