"""report.html in a real browser: headless Chromium (Debian's package) renders it, every
image decodes, and the screenshot is not blank."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from job.outputs import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian package chromium; `make test` installs it)",
)
# Reports every <img>'s decoded width once the page has loaded (0: it did not decode).
PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images).map(i => (i.complete ? i.naturalWidth : 0));
  document.body.setAttribute("data-image-widths", JSON.stringify(widths));
});
</script>"""


def chromium(tmp_path, *args):
    """Headless Chromium with a fresh profile and nothing that talks to the network."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def image_widths(page, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    result = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    found = re.search(r'data-image-widths="([^"]*)"', result.stdout)
    assert found, result.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(page_path, tmp_path, name):
    shot = tmp_path / name
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400",
             "--hide-scrollbars", page_path.as_uri())  # fmt: skip
    img = cv2.imread(str(shot))
    assert img is not None, "no screenshot"
    return img


def assert_not_blank(img):
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert gray.std() > 5  # a blank page is one flat colour (std 0)
    assert (gray < 128).mean() > 0.002  # some dark ink: text and lines
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # charts and photos, not a blank


@pytest.mark.slow
@needs_chromium
def test_run_report_renders_with_every_image_decoded(finished_run, tmp_path):
    out, _ = finished_run
    path = os.path.join(out, "report.html")
    page = open(path).read()
    widths = image_widths(page, tmp_path)
    assert len(widths) == len(re.findall(r"<img ", page)) >= 4
    assert all(w > 0 for w in widths), widths
    img = screenshot(Path(path), tmp_path, "report.png")
    assert_not_blank(img)
    if os.environ.get("REPORT_SCREENSHOT"):  # keep it, e.g. for the README
        shutil.copy(tmp_path / "report.png", os.environ["REPORT_SCREENSHOT"])


@pytest.mark.slow
@needs_chromium
def test_comparison_report_renders(finished_run, tmp_path):
    out, summary = finished_run
    other = json.loads(json.dumps(summary))
    for h in other["history"]:
        h["val_top1"] = h["val_top1"] / 2
    page = report.comparison_html({"fine-tuned": summary, "from scratch": other}, "comparison")
    path = tmp_path / "comparison.html"
    path.write_text(page)
    widths = image_widths(page, tmp_path)
    assert len(widths) == 1 and widths[0] > 0
    assert_not_blank(screenshot(path, tmp_path, "comparison.png"))
