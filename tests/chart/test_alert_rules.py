"""The alert rules under `promtool test rules`, and every metric the rules and the dashboard
query is one the job really exports."""

from __future__ import annotations

import json
import re

import yaml
from chart_tools import CHART
from prometheus_client import CollectorRegistry
from prometheus_tools import promtool

from job.input.data import DataStats
from job.training.metrics import Metrics

FILES = CHART / "files"
ALERTS = FILES / "alerts.yaml"
ALERTS_TEST = FILES / "alerts_test.yaml"
DASHBOARD = FILES / "dashboard.json"
METRIC = re.compile(r"\bfinetune_[a-z0-9_]+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every series name a worker can expose, from the registry's metric definitions (some,
    like the GPU or outcome gauges, only carry samples in some runs)."""
    metrics = Metrics(0, CollectorRegistry())
    metrics.watch_data(DataStats())
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def rule_exprs() -> dict[str, str]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r["expr"] for r in group["rules"]}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def test_alert_rules_pass_their_promtool_unit_tests():
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    proc = promtool("test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == ["alerts.yaml"]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert fired == set(rule_exprs())
    assert {"FinetuneJobStalled", "FinetuneLossNaN"} <= quiet  # and a time they stay silent


def test_rules_and_dashboard_query_only_metrics_the_job_exports():
    exported = exported_names()
    queried = {
        name
        for expr in [*rule_exprs().values(), *dashboard_exprs()]
        for name in METRIC.findall(expr)
    }
    assert queried, "no finetune_ metric found in the rules or the dashboard"
    assert queried - exported == set(), f"not exported: {sorted(queried - exported)}"


def test_the_dashboard_charts_what_the_issue_asks_for():
    text = "\n".join(dashboard_exprs())
    for name in (
        "finetune_images_total",
        "finetune_train_loss",
        "finetune_accuracy",
        "finetune_step_phase_seconds_sum",
        "finetune_corrupt_records_total",
        "finetune_read_errors_total",
        "finetune_read_retries_total",
    ):
        assert name in text, name
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    breakdown = panels["Step time by phase (stacked, mean over ranks)"]
    assert breakdown["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "sum by (phase)" in breakdown["targets"][0]["expr"]
    errors = panels["Data errors per second by rank"]
    assert all("sum by (rank)" in t["expr"] for t in errors["targets"])


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped,
    spaces to dashes)."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_runbook_url_to_a_readme_section():
    readme = (CHART.parents[1] / "README.md").read_text()
    anchors = github_anchors(readme)
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in group["rules"]:
        url = rule["annotations"]["runbook_url"]
        page, anchor = url.split("#")
        assert page.endswith("/README.md"), url
        assert anchor == rule["alert"].lower() and anchor in anchors, url


def test_aggregating_alerts_keep_the_run():
    for name, expr in rule_exprs().items():
        for by in re.findall(r"by \(([^)]*)\)", expr):
            assert "run" in [label.strip() for label in by.split(",")], (name, by)
