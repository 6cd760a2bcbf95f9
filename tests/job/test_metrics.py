"""The metrics of one worker: names and labels, the real /metrics endpoint (linted by the
real `promtool`), feeding, and the final push to a real Pushgateway."""

from __future__ import annotations

import logging
import socket
import urllib.request
from contextlib import closing
from types import SimpleNamespace

import mxnet as mx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import binary, free_port, get, promtool, server

from job.errors import InputError
from job.input.data import DataStats
from job.training.metrics import PHASES, Metrics

ALLOWED_LABELS = {"rank", "split", "phase"}


def fed(rank: int = 0) -> Metrics:
    """A worker's metrics after a few steps, an evaluation and a checkpoint."""
    m = Metrics(rank, CollectorRegistry())
    stats = DataStats()
    stats.bytes_read, stats.corrupt_records = 4096, 2
    m.watch_data(stats)
    m.info.info({"model": "resnet18_v2", "workers": "2", "batch_size": "8", "version": "0.1.0"})
    for _ in range(3):
        m.step(8)
        m.phases(data_s=0.002, compute_s=0.3, allreduce_s=0.05)
    m.step(8)  # a step that was not sampled: counted, not timed
    m.watch_steps(lambda: 12.5, timeout=600)
    m.epoch.labels(m.rank).set(0)
    m.loss.labels(m.rank).set(1.25)
    m.lr.labels(m.rank).set(0.02)
    for split, value in (("train", 0.5), ("val", 0.625), ("val_tta", 0.75)):
        m.set_accuracy(split, value)
    m.checkpointed(1.5)
    return m


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.registry.collect()
        for s in family.samples
    }


@pytest.fixture
def served():
    m = fed()
    port = m.serve("127.0.0.1", 0)
    yield m, f"http://127.0.0.1:{port}/metrics"
    m.close()


def test_names_types_and_labels_follow_prometheus_practice():
    for family in fed().registry.collect():
        if family.name.startswith("process_"):  # prometheus-client's own collector
            continue
        assert family.name.startswith("finetune_"), family.name
        assert family.documentation.strip(), family.name
        for s in family.samples:
            assert set(s.labels) - {"le"} <= ALLOWED_LABELS | {
                "model",
                "workers",
                "batch_size",
                "version",
            }, s
            assert s.labels["rank"] == "0", s
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {
                family.name + "_total",
                family.name + "_created",
            }
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "gauge" and "timestamp" in family.name:
            assert family.name.endswith("_timestamp_seconds"), family.name


def test_accuracy_is_a_ratio_per_split():
    got = samples(fed())
    for split, value in (("train", 0.5), ("val", 0.625), ("val_tta", 0.75)):
        assert got[("finetune_accuracy", (("rank", "0"), ("split", split)))] == value
    with pytest.raises(ValueError, match="split 'test'"):
        fed().set_accuracy("test", 0.1)


def test_a_step_counts_images_and_splits_its_time_into_phases():
    got = samples(fed(rank=3))
    rank = (("rank", "3"),)
    assert got[("finetune_images_total", rank)] == 32
    assert got[("finetune_steps_total", rank)] == 4
    assert got[("finetune_seconds_since_last_step", rank)] == 12.5  # read at scrape time
    assert got[("finetune_step_timeout_seconds", rank)] == 600
    assert got[("finetune_step_seconds_count", rank)] == 3
    assert got[("finetune_step_seconds_sum", rank)] == pytest.approx(3 * 0.352)
    for phase, seconds in zip(PHASES, (0.002, 0.3, 0.05), strict=True):
        key = (("phase", phase), ("rank", "3"))
        assert got[("finetune_step_phase_seconds_sum", key)] == pytest.approx(3 * seconds)
        assert got[("finetune_step_phase_seconds_count", key)] == 3
    # Buckets fit training steps: a 2 ms data wait and a 300 ms compute land apart.
    data_le = (("le", "0.0025"), ("phase", "data"), ("rank", "3"))
    compute_le = (("le", "0.25"), ("phase", "compute"), ("rank", "3"))
    assert got[("finetune_step_phase_seconds_bucket", data_le)] == 3
    assert got[("finetune_step_phase_seconds_bucket", compute_le)] == 0


def test_data_pipeline_counters_read_the_live_stats():
    m = Metrics(1, CollectorRegistry())
    stats = DataStats()
    m.watch_data(stats)
    assert samples(m)[("finetune_corrupt_records_total", (("rank", "1"),))] == 0
    stats.corrupt_records, stats.read_retries, stats.read_errors, stats.bytes_read = 5, 2, 1, 99
    got = samples(m)
    for name, value in (
        ("finetune_corrupt_records_total", 5),
        ("finetune_read_retries_total", 2),
        ("finetune_read_errors_total", 1),
        ("finetune_read_bytes_total", 99),
    ):
        assert got[(name, (("rank", "1"),))] == value


def test_checkpoint_and_outcome_series_appear_only_once_set():
    m = Metrics(1, CollectorRegistry())
    names = {name for name, _ in samples(m)}
    for absent in (
        "finetune_last_checkpoint_timestamp_seconds",
        "finetune_checkpoint_seconds_count",
        "finetune_last_success_timestamp_seconds",
        "finetune_failed",
        "finetune_gpu_memory_used_bytes",
    ):
        assert absent not in names  # a live rank 1 on a CPU has none of these
    got = samples(fed())
    assert got[("finetune_checkpoint_seconds_count", (("rank", "0"),))] == 1
    assert got[("finetune_last_checkpoint_timestamp_seconds", (("rank", "0"),))] > 1.6e9


def test_gpu_memory_is_read_only_on_a_gpu(monkeypatch):
    m = Metrics(0, CollectorRegistry())
    m.observe_gpu_memory(mx.cpu())
    assert not any(name.startswith("finetune_gpu") for name, _ in samples(m))
    # No GPU on the test machines: stand in for CUDA's answer (free, total) on device 1.
    asked = []
    monkeypatch.setattr(
        mx.context, "gpu_memory_info", lambda i: asked.append(i) or (6 * 2**30, 16 * 2**30)
    )
    m.observe_gpu_memory(SimpleNamespace(device_type="gpu", device_id=1))
    got = samples(m)
    assert asked == [1]
    assert got[("finetune_gpu_memory_used_bytes", (("rank", "0"),))] == 10 * 2**30
    assert got[("finetune_gpu_memory_capacity_bytes", (("rank", "0"),))] == 16 * 2**30


def test_served_page_passes_promtool_check_metrics(served):
    _, url = served
    page = get(url)
    proc = promtool("check", "metrics", stdin=page)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    families = {f.name: f for f in text_string_to_metric_families(page)}
    (info,) = families["finetune_build_info"].samples  # an Info is a gauge of 1 in text
    assert info.value == 1
    assert info.labels == {
        "rank": "0",
        "model": "resnet18_v2",
        "workers": "2",
        "batch_size": "8",
        "version": "0.1.0",
    }


def test_close_stops_the_server(served):
    m, url = served
    assert "finetune_images_total" in get(url)
    m.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_a_taken_port_is_a_one_line_error_naming_the_key():
    with closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=rf"metrics_port: .*127\.0\.0\.1:{port}"):
            Metrics(0, CollectorRegistry()).serve("127.0.0.1", port)


# The Pushgateway.
@pytest.fixture
def pushgateway(tmp_path):
    port = free_port()
    args = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with server(args, port, str(tmp_path / "pushgateway.log")) as base:
        yield base


def pushed(base: str) -> dict[str, dict[str, float]]:
    """rank -> {sample name: value} of the job's groups on the Pushgateway."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(get(base + "/metrics")):
        for s in family.samples:
            if s.labels.get("job") == "finetune-job" and not s.labels.get("le"):
                if "phase" not in s.labels and "split" not in s.labels:
                    out.setdefault(s.labels["rank"], {})[s.name] = s.value
    return out


def test_final_push_groups_by_rank_with_the_outcome(pushgateway):
    fed(rank=0).push(pushgateway, success=True)
    fed(rank=1).push(pushgateway, success=False)
    groups = pushed(pushgateway)
    assert set(groups) == {"0", "1"}
    assert groups["0"]["finetune_failed"] == 0
    assert groups["0"]["finetune_last_success_timestamp_seconds"] > 1.6e9
    assert groups["0"]["finetune_images_total"] == 32
    assert groups["1"]["finetune_failed"] == 1
    assert "finetune_last_success_timestamp_seconds" not in groups["1"]
    # A later successful run replaces the group: the failure marker clears.
    fed(rank=1).push(pushgateway, success=True)
    assert pushed(pushgateway)["1"]["finetune_failed"] == 0


def test_an_unreachable_pushgateway_only_warns(caplog):
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="job.training.metrics"):
        fed().push(url, success=True)
    assert "push failed" in caplog.text and url in caplog.text


def test_promtool_flags_a_badly_named_metric():
    """The lint the live-page tests rely on does catch bad names."""
    bad = (
        "# HELP finetune_loss_count x\n# TYPE finetune_loss_count counter\nfinetune_loss_count 1\n"
    )
    proc = promtool("check", "metrics", stdin=bad)
    assert proc.returncode != 0 and "_total" in proc.stdout + proc.stderr


def test_progress_gauges_and_the_standard_process_collector():
    m = fed()
    m.set_progress(0.1, None)
    samples = {s.name: s.value for family in m.registry.collect() for s in family.samples}
    assert samples["finetune_eta_seconds"] != samples["finetune_eta_seconds"]  # NaN: unknown yet
    m.set_progress(0.25, 90.0)
    samples = {s.name: s.value for family in m.registry.collect() for s in family.samples}
    assert samples["finetune_progress_ratio"] == 0.25
    assert samples["finetune_eta_seconds"] == 90.0
    # The standard process_* series of this very process (Linux /proc).
    assert samples["process_resident_memory_bytes"] > 0
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_start_time_seconds"] > 1.6e9
