"""Metrics end to end with real components: a 2-worker `horovodrun` run serves /metrics on
ports P and P+1, a Prometheus server started here scrapes both (and a Pushgateway started
here), `promtool` lints the live pages, and the run's final push lands in the Pushgateway.
The dashboard's and the alert rules' queries run against what Prometheus scraped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import binary, free_port, get, promtool, query, server, wait_for

CHART_FILES = Path(__file__).resolve().parents[2] / "charts" / "finetune-job" / "files"
PUSH_JOB = "finetune-job"
# 2 workers × 8 images a step, 80 steps an epoch, 2 epochs: ~15-25 s of steps on 2 CPU
# cores after ~6 s of start-up, so Prometheus (1 s interval) scrapes both ranks many times.
RUN = dict(images=1280, batch=8, epochs=2)
STEPS = RUN["epochs"] * RUN["images"] // (RUN["batch"] * 2)


@dataclass
class TwoWorkerRun:
    prometheus: str
    pushgateway: str
    port: int  # rank 0 serves here, rank 1 on port + 1
    proc: subprocess.Popen
    log: Path
    started: float

    def worker_url(self, rank: int) -> str:
        return f"http://127.0.0.1:{self.port + rank}/metrics"

    def finished(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)


def prometheus_config(path: Path, port: int, pushgateway_port: int) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(CHART_FILES / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": "finetune-workers",
                "static_configs": [{"targets": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]}],
            },
            {
                "job_name": "pushgateway",
                "honor_labels": True,  # keep the pushed job="finetune-job" and rank
                "static_configs": [{"targets": [f"127.0.0.1:{pushgateway_port}"]}],
            },
        ],
    }
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def run(launch_env, tmp_path_factory, train_on_two) -> Iterator[TwoWorkerRun]:
    """Prometheus and a Pushgateway on loopback, then `horovodrun -np 2` training that
    serves metrics on P, P+1 and pushes at the end. Everything stops at module end."""
    tmp = tmp_path_factory.mktemp("prometheus")
    port, prom_port, pgw_port = free_port(consecutive=2), free_port(), free_port()
    prometheus_config(tmp / "prometheus.yml", port, pgw_port)
    pgw_args = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{pgw_port}"]
    prom_args = [
        binary("prometheus"),
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    with (
        server(pgw_args, pgw_port, str(tmp / "pushgateway.log")) as pushgateway,
        server(prom_args, prom_port, str(tmp / "prometheus.log")) as prometheus,
    ):
        cmd = train_on_two(
            "horovodrun",
            *("--synthetic", "--pretrained", "none"),
            *("--synthetic-images", str(RUN["images"]), "--batch-size", str(RUN["batch"])),
            *("--epochs", str(RUN["epochs"]), "--image-size", "32", "--log-interval", "10"),
            *("--metrics-port", str(port), "--metrics-address", "127.0.0.1"),
            *("--pushgateway", pushgateway, "--log-format", "json"),
            *("--output", str(tmp / "out")),
        )
        log = tmp / "run.log"
        with open(log, "wb") as out:
            # Its own session, so the finalizer can stop horovodrun, mpirun and both workers.
            proc = subprocess.Popen(
                cmd, env=launch_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            yield TwoWorkerRun(prometheus, pushgateway, port, proc, log, time.time())
        finally:
            stop_session(proc)


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def stop_session(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a launcher started with ``start_new_session`` and everything it started: mpirun
    puts each worker in its own process group, but they all stay in the session."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # mpirun forwards it to the workers
    deadline = time.monotonic() + grace
    while (proc.poll() is None or session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll() reaps the launcher: a zombie still counts in `ps -s`
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):  # gone since the listing
            os.kill(pid, signal.SIGKILL)
    proc.wait(grace)


def steps_served(url: str) -> float:
    for family in text_string_to_metric_families(get(url, timeout=2)):
        if family.name == "finetune_steps":
            return sum(s.value for s in family.samples if s.name == "finetune_steps_total")
    return 0


def by_rank(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def both_ranks(run: TwoWorkerRun, promql: str, positive: bool = False) -> dict | None:
    """rank -> value once the query has both ranks (and positive values, if asked)."""
    values = by_rank(query(run.prometheus, promql))
    if set(values) != {"0", "1"} or (positive and min(values.values()) <= 0):
        return None
    return values


@pytest.mark.slow
def test_promtool_check_metrics_passes_on_each_live_worker(run):
    for rank in (0, 1):
        url = run.worker_url(rank)
        wait_for(f"rank {rank} to train (at {url})", lambda u=url: steps_served(u) > 0, 120)
        page = get(url)
        assert f'finetune_images_total{{rank="{rank}"}}' in page
        proc = promtool("check", "metrics", stdin=page)
        assert proc.returncode == 0, f"rank {rank}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.slow
def test_prometheus_scrapes_a_positive_image_rate_and_accuracy_for_each_rank(run):
    # The highest 5 s rate of the last 2 minutes: still there if the run has just ended.
    rate = (
        "max by (rank) (max_over_time("
        'rate(finetune_images_total{job="finetune-workers"}[5s])[2m:1s]))'
    )
    rates = wait_for(
        "a positive image rate of both ranks",
        lambda: both_ranks(run, rate, positive=True),
        timeout=90,
        interval=1,
    )
    assert min(rates.values()) > 0
    # The accuracy gauge is first set at the end of the first log interval (10 steps).
    accuracy = wait_for(
        "the train accuracy of both ranks",
        lambda: both_ranks(run, 'last_over_time(finetune_accuracy{split="train"}[2m])'),
        timeout=60,
        interval=1,
    )
    assert all(0 <= a <= 1 for a in accuracy.values())
    phases = query(
        run.prometheus,
        "sum by (phase) (last_over_time(finetune_step_phase_seconds_count[2m]))",
    )
    assert {r["metric"]["phase"] for r in phases} == {"data", "compute", "allreduce"}


@pytest.mark.slow
def test_dashboard_queries_run_on_the_scraped_metrics(run):
    dashboard = json.loads((CHART_FILES / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Charted while the job trains; GPU memory, errors and the rest may be empty here.
    must_have_data = ("finetune_images_total", "finetune_train_loss", "step_phase_seconds_sum")
    for expr in exprs:
        promql = expr.replace("$namespace", ".*").replace("$job", "finetune-workers")
        promql = f"last_over_time(({promql})[2m:1s])"
        result = query(run.prometheus, promql)  # a bad expression fails here (HTTP 400)
        if any(name in expr for name in must_have_data) and not result:
            # A series first scraped in the last second is not yet in the subquery's steps.
            wait_for(expr, lambda q=promql: query(run.prometheus, q), timeout=30, interval=1)


@pytest.mark.slow
def test_prometheus_loads_every_alert_rule(run):
    body = json.loads(get(run.prometheus + "/api/v1/rules"))
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    expected = {
        r["alert"]
        for r in yaml.safe_load((CHART_FILES / "alerts.yaml").read_text())["groups"][0]["rules"]
    }
    assert {r["name"] for r in rules} == expected
    wait_for(
        "every rule to be evaluated",
        lambda: all(
            r["health"] == "ok"
            for g in json.loads(get(run.prometheus + "/api/v1/rules"))["data"]["groups"]
            for r in g["rules"]
        ),
        timeout=15,
    )


@pytest.mark.slow
def test_the_run_pushes_its_final_metrics_for_each_rank(run):
    assert run.finished() == 0, run.log.read_text()[-3000:]
    groups: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(get(run.pushgateway + "/metrics")):
        for s in family.samples:
            if s.labels.get("job") == PUSH_JOB and set(s.labels) <= {"job", "instance", "rank"}:
                groups.setdefault(s.labels["rank"], {})[s.name] = s.value
    assert set(groups) == {"0", "1"}
    for rank, got in groups.items():
        assert got["finetune_failed"] == 0, rank
        assert got["finetune_last_success_timestamp_seconds"] >= run.started, rank
        assert got["finetune_steps_total"] == STEPS, rank
        assert got["finetune_images_total"] == STEPS * RUN["batch"], rank
    assert groups["0"]["finetune_last_checkpoint_timestamp_seconds"] >= run.started
    assert "finetune_last_checkpoint_timestamp_seconds" not in groups["1"]  # rank 0 writes them


@pytest.mark.slow
def test_a_finished_runs_pushed_series_do_not_look_stalled(run):
    """Prometheus scrapes the Pushgateway (honor_labels); the frozen counters it holds are
    left out of the stalled-job alert's rate, as the alert's `unless` intends."""
    assert run.finished() == 0
    # Once Prometheus holds two samples of the pushed counters, their rate is there (0).
    rate = "sum by (job) (rate(finetune_images_total[5m]))"
    wait_for(
        "the pushed counters' rate in Prometheus",
        lambda: PUSH_JOB in {r["metric"]["job"] for r in query(run.prometheus, rate)},
        timeout=30,
        interval=1,
    )
    pushed = query(run.prometheus, f'finetune_last_success_timestamp_seconds{{job="{PUSH_JOB}"}}')
    assert {r["metric"]["rank"] for r in pushed} == {"0", "1"}
    rules = yaml.safe_load((CHART_FILES / "alerts.yaml").read_text())["groups"][0]["rules"]
    (stalled,) = [r["expr"] for r in rules if r["alert"] == "FinetuneJobStalled"]
    inner = re.sub(r"\s*==\s*0\s*$", "", stalled)  # the rate it compares with 0
    assert PUSH_JOB not in {r["metric"].get("job") for r in query(run.prometheus, inner)}


@pytest.mark.slow
def test_rank_0_logs_json_lines(run):
    assert run.finished() == 0
    lines = run.log.read_text().splitlines()
    progress = []
    for line in lines:
        tag, _, text = line.partition("<stderr>:")
        if text.startswith("{"):
            entry = json.loads(text)  # every log line is JSON, progress or not
            if entry.get("event") in ("step", "epoch"):
                assert tag == "[1,0]", line  # only rank 0 logs progress
                progress.append(entry)
    steps = [p for p in progress if p["event"] == "step"]
    epochs = [p for p in progress if p["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert len(steps) == STEPS // 10
    for p in steps:
        assert {"epoch", "step", "loss", "train_top1", "images_per_second", "lr"} <= set(p)
        assert 0 <= p["data_wait_share"] <= 1 and p["images_per_second"] > 0


@pytest.mark.slow
def test_a_failing_run_pushes_the_failure_marker(launch_env, tmp_path):
    """A run whose loss turns NaN stops with exit 1 and pushes failed=1 and the NaN loss."""
    port = free_port()
    args = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with server(args, port, str(tmp_path / "pushgateway.log")) as pushgateway:
        cmd = [
            *("finetune-job", "train", "--synthetic", "--pretrained", "none"),
            *("--synthetic-images", "320", "--batch-size", "8", "--image-size", "32"),
            *("--lr", "1e9", "--warmup-epochs", "0", "--log-interval", "1"),
            *("--metrics-port", "0", "--pushgateway", pushgateway),
            *("--output", str(tmp_path / "out")),
        ]
        proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "training loss is nan" in proc.stderr
        got = {
            s.name: s.value
            for f in text_string_to_metric_families(get(pushgateway + "/metrics"))
            for s in f.samples
            if s.labels.get("job") == PUSH_JOB and s.labels.get("rank") == "0"
        }
    assert got["finetune_failed"] == 1
    assert "finetune_last_success_timestamp_seconds" not in got
    assert got["finetune_train_loss"] != got["finetune_train_loss"]  # NaN: what the alert sees


def test_a_run_that_fails_at_start_pushes_the_failure_marker_under_its_job(launch_env, tmp_path):
    """A missing dataset fails before training; the push still happens, in its own group."""
    port = free_port()
    args = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with server(args, port, str(tmp_path / "pushgateway.log")) as pushgateway:
        cmd = [
            *("finetune-job", "train", "--data", str(tmp_path / "missing"), "--pretrained"),
            *("none", "--metrics-port", "0", "--pushgateway", pushgateway),
            *("--pushgateway-job", "nightly-flowers", "--output", str(tmp_path / "out")),
        ]
        proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        got = {
            s.name: s.value
            for f in text_string_to_metric_families(get(pushgateway + "/metrics"))
            for s in f.samples
            if s.labels.get("job") == "nightly-flowers" and s.labels.get("rank") == "0"
        }
    assert got["finetune_failed"] == 1
