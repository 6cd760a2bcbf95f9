"""The chart's README is generated from Chart.yaml and values.yaml (charts/chartdoc.py) and is
current; Chart.yaml carries what a chart user looks for (maintainers, sources, versions)."""

from __future__ import annotations

import chartdoc
import yaml
from chart_tools import CHART, run_helm

VALUES = (CHART / "values.yaml").read_text(encoding="utf-8")


def test_a_stale_readme_is_caught(tmp_path):
    chart = tmp_path / "chart"
    chart.mkdir()
    for name in ("Chart.yaml", "values.yaml", "README.md"):
        (chart / name).write_text((CHART / name).read_text(encoding="utf-8"), encoding="utf-8")
    (chart / "values.yaml").write_text(
        VALUES + "\n# -- A value added later\nnewValue: 3\n", encoding="utf-8"
    )
    assert chartdoc.main(["--check", "--chart", str(chart)]) == 1
    assert chartdoc.main(["--chart", str(chart)]) == 0
    assert "| `newValue` | int | `3` | A value added later |" in (chart / "README.md").read_text()
    assert chartdoc.main(["--check", "--chart", str(chart)]) == 0


def test_every_value_has_a_description_on_it_or_a_parent():
    assert chartdoc.undocumented_keys(VALUES) == []


def test_generator_takes_any_keys_nesting_lists_and_multiline_comments():
    text = """# yaml-language-server: $schema=values.schema.json
# A file comment, not a description.

# -- Top-level switch
enabled: true
kueue:
  # -- Queue name
  # continued on a second line
  queueName: ""
  # -- Extra labels
  labels: {}
  # team: ml
scheduling:
  # -- Gang scheduling with a PodGroup
  gang:
    minAvailable: 3
  # -- Tolerations
  tolerations:
    - key: nvidia.com/gpu
      operator: Exists
  # -- After a list of mappings
  priority: 5
"x.y": 1
"""
    values = {v.key: v for v in chartdoc.documented_values(text)}
    assert list(values) == [
        "enabled",
        "kueue.queueName",
        "kueue.labels",
        "scheduling.gang",
        "scheduling.tolerations",
        "scheduling.priority",
    ]
    assert values["kueue.queueName"].description == "Queue name continued on a second line"
    assert values["scheduling.gang"].default == {"minAvailable": 3}
    assert values["scheduling.tolerations"].default == [
        {"key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert chartdoc.undocumented_keys(text) == ["x.y"]


def test_helm_show_readme_is_the_generated_readme(helm):
    shown = run_helm(helm, "show", "readme", str(CHART))
    assert shown.strip() == (CHART / "README.md").read_text(encoding="utf-8").strip()


def test_chart_metadata_states_its_home_maintainers_and_minimum_versions(helm):
    chart = yaml.safe_load(run_helm(helm, "show", "chart", str(CHART)))
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    assert chart["maintainers"] and all(m["name"] for m in chart["maintainers"])
    assert chart["kubeVersion"] == ">=1.27.0-0"
    # launcherCreationPolicy arrived in the MPI Operator v0.5.0 (kubeflow/mpi-operator#484).
    assert chart["annotations"]["finetune-job/mpi-operator-min-version"] == "v0.5.0"
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    assert "MPI Operator v0.5.0 or later" in readme
