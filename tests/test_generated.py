"""Generated files are current, and a change of a rule shows up as a stale file.

``make generate`` writes every one of them; this is the one test that fails while any is
stale, naming the file and the command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from job import schema

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "make generate"


def generated() -> dict[Path, str]:
    """Every generated file and what its generator writes into it now."""
    import chartdoc

    sys.path.insert(0, str(ROOT / "examples"))
    import katib_experiment
    from chart_tools import find_or_install_helm

    wanted = {
        ROOT / rel: render((ROOT / rel).read_text(encoding="utf-8"))
        for rel, render in schema.GENERATED
    }
    wanted[chartdoc.CHART / "README.md"] = chartdoc.render(chartdoc.CHART)
    wanted[katib_experiment.EXPERIMENT] = katib_experiment.text(find_or_install_helm())
    return wanted


def test_every_generated_file_is_current():
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generated().items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale: {', '.join(stale)}: run `{COMMAND}`"


def test_a_changed_default_makes_values_and_schema_stale_until_generated(tmp_path):
    """In a copy of the sources: a rule's default changed in job/config.py alone."""
    shutil.copytree(ROOT / "job", tmp_path / "job", ignore=shutil.ignore_patterns("__pycache__"))
    chart = tmp_path / "charts" / "finetune-job"
    chart.mkdir(parents=True)
    for name in ("values.yaml", "values.schema.json"):
        shutil.copy(ROOT / "charts" / "finetune-job" / name, chart / name)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    config = tmp_path / "job" / "config.py"
    text = config.read_text(encoding="utf-8")
    assert text.count('10, "training epochs"') == 1
    config.write_text(text.replace('10, "training epochs"', '11, "training epochs"'))

    def generator(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "job.schema", *argv, str(tmp_path)],
            cwd=tmp_path,  # the copy's job package comes first on sys.path
            capture_output=True,
            text=True,
            timeout=120,
        )

    check = generator("--check")
    assert check.returncode == 1
    for rel in ("charts/finetune-job/values.yaml", "charts/finetune-job/values.schema.json"):
        assert f"{tmp_path / rel} is stale: run `{COMMAND}`" in check.stderr
    assert generator().returncode == 0
    assert generator("--check").returncode == 0
    assert "\n  epochs: 11\n" in (chart / "values.yaml").read_text(encoding="utf-8")
    assert '"training epochs (job default: 11)"' in (chart / "values.schema.json").read_text()
