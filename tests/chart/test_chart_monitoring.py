"""Metrics ports, the headless Service, PodMonitor, PrometheusRule and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from chart_tools import CHART, HelmError, by_kind, one, render, replica_container

ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
METRICS = (
    "finetune_images_total",
    "finetune_train_loss",
    "finetune_accuracy",
    "finetune_step_phase_seconds",
    "finetune_corrupt_records_total",
)
ALL_ON = {
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}


def values(**top):
    training = {"data": "s3://d/ds", "output": "s3://d/out", **top.pop("training", {})}
    return {"training": training, **top}


@pytest.mark.parametrize("slots", [1, 3], ids=["1-slot", "3-slots"])
def test_every_local_rank_has_a_named_metrics_port(helm, slots):
    docs = render(
        helm, values(slotsPerWorker=slots, training={"metrics_port": 9200}, metrics=ALL_ON)
    )
    expected = [("metrics" if r == 0 else f"metrics-{r}", 9200 + r) for r in range(slots)]
    worker = replica_container(one(docs, "MPIJob"), "Worker")
    assert [(p["name"], p["containerPort"]) for p in worker["ports"]] == expected
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == expected
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "worker"
    monitor = one(docs, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == [n for n, _ in expected]
    pod_labels = one(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]
    for selector in (service["spec"]["selector"], monitor["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels["labels"].items()


def test_launcher_pods_are_not_selected_for_metrics(helm):
    docs = render(helm, values(metrics=ALL_ON))
    launcher = one(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]
    selector = one(docs, "Service")["spec"]["selector"]
    assert not selector.items() <= launcher["metadata"]["labels"].items()


def test_metrics_port_0_turns_ports_service_and_podmonitor_off(helm):
    docs = render(helm, values(training={"metrics_port": 0}, metrics=ALL_ON))
    assert "ports" not in replica_container(one(docs, "MPIJob"), "Worker")
    assert not by_kind(docs, "Service") and not by_kind(docs, "PodMonitor")


def test_monitoring_objects_are_off_by_default(helm):
    kinds = {d["kind"] for d in render(helm, values())}
    assert "PodMonitor" not in kinds and "PrometheusRule" not in kinds
    assert len(by_kind(render(helm, values()), "ConfigMap")) == 1


def test_podmonitor_labels_and_interval(helm):
    metrics = {"podMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kps"}}}
    monitor = one(render(helm, values(metrics=metrics), namespace="train"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["train"]}
    assert {e["interval"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"30s"}


def test_prometheus_rule_carries_the_rules_file(helm):
    rule = one(render(helm, values(metrics=ALL_ON)), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_alert_rules_cover_the_job_failures():
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "finetune-job"
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) >= {
        "FinetuneJobStalled",
        "FinetuneLossNaN",
        "FinetuneThroughputDropped",
        "FinetuneCorruptRecordsHigh",
    }
    assert "rate(finetune_images_total[5m])" in alerts["FinetuneJobStalled"]["expr"]
    assert re.search(r"== 0\s*$", alerts["FinetuneJobStalled"]["expr"])
    assert alerts["FinetuneJobStalled"]["for"] == "10m"
    assert alerts["FinetuneLossNaN"]["expr"] == "finetune_train_loss != finetune_train_loss"
    assert (
        "rate(finetune_corrupt_records_total[10m])" in alerts["FinetuneCorruptRecordsHigh"]["expr"]
    )
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_alert_rules_pass_promtool():
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (make test installs the prometheus package)")
    proc = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_configmap_for_the_grafana_sidecar(helm):
    docs = render(
        helm,
        values(metrics={"dashboard": {"enabled": True, "annotations": {"grafana_folder": "ML"}}}),
    )
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["finetune-job.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_charts_every_metric_with_its_labels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    text = "\n".join(exprs)
    for metric in METRICS:
        assert metric in text, metric
    assert re.search(r'finetune_accuracy\{[^}]*split="val"', text)
    assert "by (rank)" in text and "phase" in text
    assert "finetune_step_phase_seconds_bucket" in text
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables


def test_podmonitor_tells_runs_apart_and_takes_its_scrape_settings_from_values(helm):
    drop = {"sourceLabels": ["__name__"], "regex": "finetune_step_phase_seconds_bucket"}
    drop["action"] = "drop"
    node = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    metrics = {
        "podMonitor": {
            "enabled": True,
            "namespace": "monitoring",
            "scrapeTimeout": "5s",
            "relabelings": [node],
            "metricRelabelings": [drop],
        }
    }
    monitor = one(render(helm, values(metrics=metrics), namespace="train"), "PodMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["train"]}  # the pods' one
    assert monitor["spec"]["podTargetLabels"] == [
        "finetune-job/run",
        "training.kubeflow.org/job-name",
    ]
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["scrapeTimeout"] == "5s"
        run, extra = endpoint["relabelings"]
        assert run["targetLabel"] == "run"
        # The MPI Operator's job-name pod label, as Prometheus' service discovery names it.
        assert run["sourceLabels"] == ["__meta_kubernetes_pod_label_training_kubeflow_org_job_name"]
        assert extra == node
        assert endpoint["metricRelabelings"] == [drop]


def test_podmonitor_defaults_to_the_release_namespace(helm):
    metrics = {"podMonitor": {"enabled": True}}
    monitor = one(render(helm, values(metrics=metrics), namespace="train"), "PodMonitor")
    assert "namespace" not in monitor["metadata"]  # helm install -n puts it there
    assert "metricRelabelings" not in monitor["spec"]["podMetricsEndpoints"][0]


def test_podmonitor_rejects_an_unknown_relabel_field(helm):
    bad = {"podMonitor": {"enabled": True, "relabelings": [{"target_label": "x"}]}}
    with pytest.raises(HelmError, match="target_label"):
        render(helm, values(metrics=bad))
