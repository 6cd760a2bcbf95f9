"""The README documents what the code has: every config key, every metric, every chart value."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_is_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick, re.MULTILINE)
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_config_key_is_in_the_configuration_table():
    from job.config import FIELDS

    missing = [k for k in FIELDS if f"| `{k}` |" not in README]
    assert missing == []


def test_every_metric_is_in_the_metrics_table():
    from job.input.data import DataStats
    from job.training.metrics import Metrics

    metrics = Metrics(rank=0)
    metrics.watch_data(DataStats())
    names = {m.name for m in metrics.registry.collect() if m.name.startswith("finetune_")}
    assert "`process_*`" in README  # prometheus-client's standard process collector
    documented = set(re.findall(r"^\| `(finetune_\w+)` \|", README, re.MULTILINE))
    counters = {m.name for m in metrics.registry.collect() if m.type == "counter"}
    expected = {n + "_total" if n in counters else n for n in names}
    expected = {n + "_info" if n == "finetune_build" else n for n in expected}
    assert expected - documented == set()


CHART_DIR = ROOT / "charts/finetune-job"
CHART_KEYS = json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]
CHART_README = (CHART_DIR / "README.md").read_text()


@pytest.mark.parametrize("key", [k for k in CHART_KEYS if k != "global"])  # global: Helm's own
def test_every_top_level_chart_value_is_in_the_chart_readme(key):
    assert re.search(rf"^\| `{key}[.`]", CHART_README, re.MULTILINE), key


def test_the_readme_links_the_chart_readme_instead_of_repeating_its_values():
    assert "(charts/finetune-job/README.md)" in README
    assert not re.search(r"^\| `image\.repository` \|", README, re.MULTILINE)
