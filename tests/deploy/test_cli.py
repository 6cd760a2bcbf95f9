"""The subcommands end to end against the fake API server: output and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from fake_apiserver import failed, running, succeeded

from deploy import cli
from deploy import constants as c


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune-job")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def write_summary(val_top1: float):
    """A scripted step: the run writes summary.json to its output, as rank 0 does."""

    def act(api, ns, name):
        out = Path(
            api.objects[("mpijobs", ns, name)]["metadata"]["annotations"][c.OUTPUT_ANNOTATION]
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"val_top1": val_top1}))

    return act


@pytest.fixture
def submit_args(kubeconfig_path, tmp_path):
    return [
        "submit",
        "--kubeconfig",
        kubeconfig_path,
        "--set",
        "training.synthetic=true",
        "--set",
        f"training.output={tmp_path / 'flowers'}",
    ]


@pytest.mark.parametrize("command", ["submit", "status", "logs", "delete", "list"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    assert "example:\n  finetune-job " + command in capsys.readouterr().out


def test_main_command_has_the_subcommands():
    from job.cli import build_parser

    args = build_parser().parse_args(["status", "r1"])
    assert args.func is cli.status


def test_dry_run_prints_the_objects(capsys, tmp_path):
    code = run(
        "submit",
        "--set",
        "training.synthetic=true",
        "--set",
        "training.output=s3://b/flowers",
        "--schedule",
        "nightly",
        "--dry-run",
    )
    assert code == 0
    mpijob, config_map = yaml.safe_load_all(capsys.readouterr().out)
    assert mpijob["kind"] == "MPIJob" and config_map["kind"] == "ConfigMap"
    assert mpijob["metadata"]["labels"][c.SCHEDULE_LABEL] == "nightly"


def test_submit_without_wait_prints_the_name(api, submit_args, capsys):
    assert run(*submit_args) == 0
    name = capsys.readouterr().out.strip()
    assert ("mpijobs", "team-a", name) in api.objects


def test_submit_wait_success_gates_saves_logs_and_moves_latest(api, submit_args, tmp_path, capsys):
    api.script([(0.05, running("training...\n")), (0.1, write_summary(0.93)), (0.15, succeeded())])
    code = run(
        *submit_args,
        "--wait",
        "--timeout",
        "5",
        "--min-accuracy",
        "0.9",
        "--not-worse",
        "--delete-after",
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out) == {"val_top1": 0.93}
    latest = json.loads((tmp_path / "flowers" / "latest").read_text())
    assert latest["val_top1"] == 0.93 and latest["model"].endswith("/model.params")
    assert (tmp_path / "flowers" / "runs" / latest["run"] / "launcher.log").read_text() == (
        "training...\n"
    )
    assert "latest -> " in err
    assert not api.objects  # --delete-after, once the logs were saved


def test_next_run_starts_from_latest_and_a_worse_one_is_rejected(
    api, submit_args, tmp_path, capsys
):
    api.script([(0.05, write_summary(0.9)), (0.1, succeeded())])
    assert run(*submit_args, "--wait", "--timeout", "5") == 0
    first = json.loads((tmp_path / "flowers" / "latest").read_text())
    api.script([(0.05, write_summary(0.8)), (0.1, succeeded())])
    capsys.readouterr()
    code = run(
        *submit_args,
        "--set",
        f"training.pretrained={tmp_path / 'flowers' / 'latest'}",
        "--wait",
        "--timeout",
        "5",
        "--not-worse",
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out) == {"val_top1": 0.8}
    assert f"pretrained {tmp_path}/flowers/latest -> {first['model']}" in err
    assert err.strip().endswith("left unchanged")
    assert "finetune-job: error: run " in err and "is worse than latest's 0.9000" in err
    assert json.loads((tmp_path / "flowers" / "latest").read_text()) == first
    second = [
        o
        for (kind, _, _), o in api.objects.items()
        if kind == "configmaps" and o["metadata"]["labels"][c.RUN_LABEL] != first["run"]
    ]
    assert yaml.safe_load(second[0]["data"]["config.yaml"])["pretrained"] == first["model"]


@pytest.mark.parametrize(
    ("steps", "extra", "code", "message"),
    [
        (
            [
                (0.05, failed("launcher exited with 1")),
            ],
            [],
            1,
            "Failed (BackoffLimitExceeded",
        ),
        ([(0.05, running())], ["--timeout", "0.5"], 2, "did not finish within 0.5 s"),
        (
            [(0.05, write_summary(0.5)), (0.1, succeeded())],
            ["--min-accuracy", "0.9"],
            1,
            "val_top1 0.5000 is below --min-accuracy 0.9000",
        ),
    ],
    ids=["job-failed", "timed-out", "below-min-accuracy"],
)
def test_submit_wait_exit_codes(api, submit_args, tmp_path, capsys, steps, extra, code, message):
    api.script(steps)
    assert run(*submit_args, "--wait", "--timeout", "5", *extra) == code
    err = capsys.readouterr().err
    assert message in err
    assert err.strip().splitlines()[-1].startswith("finetune-job: error: ")
    assert not (tmp_path / "flowers" / "latest").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "workers.replica=3"], "unknown values key 'workers.replica'"),
        (["--set", "training.epochs=lots"], "config key 'epochs'"),
        (["--values", "/nonexistent.yaml"], "values file /nonexistent.yaml"),
    ],
    ids=["unknown-key", "bad-training-value", "missing-values-file"],
)
def test_bad_input_exits_3(api, submit_args, capsys, argv, message):
    assert run(*submit_args, *argv) == 3
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not api.objects


def test_rbac_denied_exits_3(api, submit_args, capsys):
    api.forbid("create", "mpijobs")
    assert run(*submit_args) == 3
    assert "permission denied: cannot create mpijobs.kubeflow.org" in capsys.readouterr().err


def test_status_logs_delete(api, kubeconfig_path, submit_args, capsys):
    api.script([(0.0, running("hello\n")), (0.05, failed("boom"))])
    run(*submit_args)
    name = capsys.readouterr().out.strip()
    cluster = ["--kubeconfig", kubeconfig_path]
    import time

    time.sleep(0.2)
    assert run("status", name, *cluster) == 1  # the job failed
    assert f"team-a/{name} Failed (BackoffLimitExceeded: boom)" in capsys.readouterr().out
    assert run("status", name, "-o", "json", *cluster) == 1
    assert json.loads(capsys.readouterr().out)["phase"] == "Failed"
    assert run("logs", name, *cluster) == 0
    assert capsys.readouterr().out == "hello\n"
    assert run("list", *cluster) == 0
    assert name in capsys.readouterr().out
    assert run("delete", name, *cluster) == 0
    assert run("status", name, *cluster) == 3
    assert f"mpijobs.kubeflow.org team-a/{name} not found" in capsys.readouterr().err


def write_run(val_top1: float, recalls: dict[str, float]):
    """A scripted step: the run writes summary.json and a per-class eval.json."""

    def act(api, ns, name):
        write_summary(val_top1)(api, ns, name)
        out = Path(
            api.objects[("mpijobs", ns, name)]["metadata"]["annotations"][c.OUTPUT_ANNOTATION]
        )
        per_class = [{"class": k, "count": 5, "recall": r} for k, r in recalls.items()]
        (out / "eval.json").write_text(json.dumps({"per_class": per_class}))

    return act


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        (["--set", "training.max_class_drop=0.2"], 1),  # from the values, as the CronJob has it
        (["--max-class-drop", "0.2"], 1),
        (["--set", "training.max_class_drop=0.2", "--max-class-drop", "0"], 0),  # flag wins
        ([], 0),  # off by default
    ],
    ids=["values", "flag", "flag-overrides-values", "default-off"],
)
def test_a_run_that_loses_one_class_is_not_promoted(
    api, submit_args, tmp_path, capsys, flags, code
):
    api.script([(0.05, write_run(0.8, {"cat": 0.9, "dog": 0.7})), (0.1, succeeded())])
    assert run(*submit_args, "--wait", "--timeout", "5") == 0
    first = json.loads((tmp_path / "flowers" / "latest").read_text())
    api.script([(0.05, write_run(0.85, {"cat": 0.6, "dog": 1.0})), (0.1, succeeded())])
    capsys.readouterr()
    assert run(*submit_args, *flags, "--wait", "--timeout", "5", "--not-worse") == code
    err = capsys.readouterr().err
    latest = json.loads((tmp_path / "flowers" / "latest").read_text())
    if code:
        assert (
            "recall dropped by more than --max-class-drop 0.2" in err
            and "cat 0.900 -> 0.600" in err
        )
        assert latest == first
    else:
        assert latest["run"] != first["run"]
