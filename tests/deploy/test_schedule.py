"""Single-flight, resumable schedules against the fake API server: one run of a schedule at a
time, no run outliving its submit, and a run whose predecessor was failed by an evicted
worker resuming from that predecessor's checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from fake_apiserver import failed, running, succeeded
from in_process import guarded

from job.config import Config
from job.exitcodes import ExitCode
from job.training import lifecycle

SCHEDULE = "flowers-weekly"


def run(*argv: str) -> int:
    return guarded(*argv)


@pytest.fixture
def submit(kubeconfig_path, helm, tmp_path):
    base = [
        "submit",
        *("--kubeconfig", kubeconfig_path, "--schedule", SCHEDULE, "--helm", str(helm)),
        *("--set", "training.synthetic=true", "--set", f"training.output={tmp_path / 'root'}"),
        *("--set", "training.pretrained=none", "--set", "training.model=resnet18_v1"),
        *("--set", "training.image_size=32", "--set", "training.batch_size=8"),
        *("--set", "training.synthetic_images=16", "--set", "training.epochs=2"),
    ]
    return lambda *extra: run(*base, *extra)


def mpijobs(api) -> dict[str, dict]:
    return {key[2]: obj for key, obj in api.objects.items() if key[0] == "mpijobs"}


def run_config(api, name: str) -> dict:
    (cm,) = [
        obj
        for key, obj in api.objects.items()
        if key[0] == "configmaps" and key[2].startswith(name)
    ]
    return yaml.safe_load(cm["data"]["config.yaml"])


def test_a_second_tick_refuses_while_the_first_run_is_unfinished(api, submit, capsys):
    assert submit() == 0
    first = capsys.readouterr().out.strip()
    assert submit() == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"team-a/{first} has not finished" in err
    assert list(mpijobs(api)) == [first]
    assert submit("--allow-overlap") == 0  # told otherwise
    assert len(mpijobs(api)) == 2


def test_a_finished_run_lets_the_next_tick_start(api, submit, capsys):
    assert submit() == 0
    first = capsys.readouterr().out.strip()
    succeeded()(api, "team-a", first)
    assert submit() == 0
    assert len(mpijobs(api)) == 2


def test_the_mpijob_cannot_outlive_the_submit_and_a_timed_out_submit_says_what_it_left(
    api, submit, capsys
):
    api.script([(0.05, running())])
    assert submit("--wait", "--timeout", "1.5") == ExitCode.TIMED_OUT
    err = capsys.readouterr().err
    (name,) = mpijobs(api)
    assert mpijobs(api)[name]["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1
    assert f"left running: MPIJob team-a/{name}" in err and "activeDeadlineSeconds 1" in err


def test_a_shorter_deadline_of_the_values_is_kept(api, submit):
    api.script([(0.05, running()), (0.1, succeeded())])
    submit("--set", "runPolicy.activeDeadlineSeconds=30", "--wait", "--timeout", "600")
    (job,) = mpijobs(api).values()
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 30


@pytest.mark.slow
def test_a_run_failed_by_an_evicted_worker_is_resumed_by_the_next_tick(api, submit, capsys):
    assert submit() == 0
    first = capsys.readouterr().out.strip()
    first_config = run_config(api, first)
    # The first run trains one epoch and checkpoints; then a worker is evicted and the
    # operator marks the whole MPIJob Failed, before any summary.
    cfg = Config(**{**first_config, "epochs": 1, "metrics_port": 0})
    lifecycle.run(cfg)
    os.remove(os.path.join(cfg.output, "summary.json"))
    failed("Worker pod flowers-worker-1 was evicted: the node was low on memory")(
        api, "team-a", first
    )

    assert submit() == 0
    err = capsys.readouterr().err
    assert f"resuming the failed run in {cfg.output}" in err
    second = [n for n in mpijobs(api) if n != first][0]
    second_config = run_config(api, second)
    assert second_config["resume_from"] == cfg.output
    assert second_config["output"] != cfg.output

    summary = lifecycle.run(Config(**{**second_config, "metrics_port": 0}))
    assert summary["resumed_from"].startswith(os.path.join(cfg.output, "checkpoints", "step-"))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]  # epoch 1 was not trained again
    on_disk = json.load(open(os.path.join(second_config["output"], "summary.json")))
    assert on_disk["resumed_from"] == summary["resumed_from"]


def test_a_failed_run_without_a_checkpoint_is_not_resumed(api, submit, capsys):
    assert submit() == 0
    first = capsys.readouterr().out.strip()
    failed()(api, "team-a", first)
    assert submit() == 0
    second = [n for n in mpijobs(api) if n != first][0]
    assert "resume_from" not in run_config(api, second)
