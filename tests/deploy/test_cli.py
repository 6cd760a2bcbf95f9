"""The subcommands end to end against the fake API server: output and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from fake_apiserver import (
    failed,
    launcher_pod,
    running,
    succeeded,
    waiting,
    warning,
)
from in_process import guarded

from deploy import commands, entry
from deploy import constants as c
from deploy.errors import BadInputError, JobStuckError, JobTimeoutError, NotFoundError
from job.exitcodes import ExitCode


def parser() -> argparse.ArgumentParser:
    return entry.build_parser()


def run(*argv: str) -> int:
    return guarded(*argv)


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
def submit_args(kubeconfig_path, tmp_path, helm):
    return [
        "submit",
        "--kubeconfig",
        kubeconfig_path,
        "--helm",
        str(helm),
        "--set",
        "training.synthetic=true",
        "--set",
        f"training.output={tmp_path / 'flowers'}",
    ]


@pytest.mark.parametrize("command", ["submit", "wait", "status", "logs", "delete", "list"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    assert "example:\n  finetune-job " + command in capsys.readouterr().out


def test_main_command_has_the_subcommands():
    args = entry.build_parser().parse_args(["status", "r1"])
    assert args.func is commands.status


def test_dry_run_prints_the_objects(capsys, helm):
    code = run(
        "submit",
        "--helm",
        str(helm),
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
    assert code == ExitCode.GATE_REFUSED
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
            ExitCode.FAILED,
            "Failed (BackoffLimitExceeded",
        ),
        (
            [(0.05, running())],
            ["--timeout", "0.5"],
            ExitCode.TIMED_OUT,
            "did not finish within 0.5 s",
        ),
        (
            [(0.05, write_summary(0.5)), (0.1, succeeded())],
            ["--min-accuracy", "0.9"],
            ExitCode.GATE_REFUSED,
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
        (["--set", "workers.replica=3"], "additional properties 'replica' not allowed"),
        (["--set", "training.epochs=lots"], "'/training/epochs': got string, want integer"),
        (["--values", "/nonexistent.yaml"], "/nonexistent.yaml"),
        (["--values", "{tmp}/list.yaml"], "failed to parse {tmp}/list.yaml"),
    ],
    ids=["unknown-key", "bad-training-value", "missing-values-file", "values-not-a-mapping"],
)
def test_bad_input_exits_2(api, submit_args, tmp_path, capsys, argv, message):
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run(*submit_args, *argv) == ExitCode.BAD_INPUT
    message = message.format(tmp=tmp_path)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not api.objects


def test_a_manifest_whose_config_the_job_rejects_exits_2(api, kubeconfig_path, tmp_path, capsys):
    """A manifest bypasses the chart's schema; job.config's own rules still judge it."""
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(rendered_objects("epochs: lots")))
    code = run(
        "submit", "--from-manifest", str(tmp_path / "m.yaml"), "--kubeconfig", kubeconfig_path
    )
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "config key 'epochs' from values training" in err
    assert len(err.strip().splitlines()) == 1 and not api.objects


def rendered_objects(config_yaml: str) -> list[dict]:
    """The least a rendered MPIJob can be: a launcher that mounts its config ConfigMap."""
    pod = {
        "spec": {
            "containers": [
                {
                    "name": "launcher",
                    "volumeMounts": [{"name": "config", "mountPath": c.CONFIG_DIR}],
                }
            ],
            "volumes": [{"name": "config", "configMap": {"name": "ft-training"}}],
        }
    }
    mpijob = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "ft"},
        "spec": {"mpiReplicaSpecs": {"Launcher": {"replicas": 1, "template": pod}}},
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ft-training"},
        "data": {c.CONFIG_KEY: f"output: s3://b/o\nsynthetic: true\n{config_yaml}\n"},
    }
    return [mpijob, config_map]


# ---- runs that cannot start --------------------------------------------------------------------
SA_MISSING = 'Error creating: pods "x" is forbidden: serviceaccount "finetune-job" not found'


@pytest.mark.parametrize(
    ("steps", "flags", "expected"),
    [
        (
            [(0.05, waiting("ImagePullBackOff", 'Back-off pulling image "reg/ft:9"'))],
            ["--start-timeout", "0.5"],
            "-launcher-x1 container launcher: ImagePullBackOff for over 0.5 s: "
            'Back-off pulling image "reg/ft:9"',
        ),
        (
            [(0.05, waiting("CreateContainerConfigError", 'secret "s3" not found', role="worker"))],
            ["--start-timeout", "0.5"],
            "-worker-0 container worker: CreateContainerConfigError for over 0.5 s: "
            'secret "s3" not found',
        ),
        (
            [(0.05, warning("Job", "FailedCreate", SA_MISSING, suffix="-launcher"))],
            ["--start-timeout", "0.5"],
            f"-launcher: FailedCreate for over 0.5 s: {SA_MISSING}",
        ),
    ],
    # Unschedulable, and a ServiceAccount missing for the workers, run on the real scheduler
    # and operator in tests/cluster/test_lifecycle.py.
    ids=["image-pull", "missing-secret", "missing-launcher-service-account"],
)
def test_submit_wait_fails_in_one_line_when_a_pod_cannot_start(
    api, submit_args, capsys, steps, flags, expected
):
    api.script(steps)
    code = run(*submit_args, "--wait", "--timeout", "60", *flags)
    err = capsys.readouterr().err
    assert code == JobStuckError.exit_code
    last = err.strip().splitlines()[-1]
    assert last.startswith("finetune-job: error: MPIJob team-a/") and " cannot start: " in last
    assert expected in last
    assert "Traceback" not in err
    assert all(line.startswith("finetune-job: ") for line in err.strip().splitlines())


def test_wait_command(api, submit_args, kubeconfig_path, capsys):
    cluster = ["--kubeconfig", kubeconfig_path]
    api.script([(0.05, running()), (0.1, succeeded())])
    run(*submit_args)
    name = capsys.readouterr().out.strip()
    assert run("wait", name, "--timeout", "30", *cluster) == 0
    assert capsys.readouterr().out.strip().startswith(f"team-a/{name} Succeeded")

    api.script([(0.05, waiting("ErrImagePull", "denied"))])
    run(*submit_args)
    name = capsys.readouterr().out.strip()
    assert run("wait", name, "--start-timeout", "0.5", *cluster) == JobStuckError.exit_code
    assert f"{name}-launcher-x1 container launcher: ErrImagePull" in capsys.readouterr().err
    assert run("wait", name, "--timeout", "0.3", "--start-timeout", "0", *cluster) == (
        JobTimeoutError.exit_code
    )
    assert "did not finish within 0.3 s" in capsys.readouterr().err
    assert run("status", name, *cluster) == 0
    out = capsys.readouterr().out
    assert f"cannot start: pod {name}-launcher-x1 container launcher: ErrImagePull: denied" in out
    assert run("status", name, "-o", "json", *cluster) == 0
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem == {
        "subject": f"pod {name}-launcher-x1 container launcher",
        "pod": f"{name}-launcher-x1",
        "container": "launcher",
        "reason": "ErrImagePull",
        "message": "denied",
    }
    assert run("wait", "nope", *cluster) == NotFoundError.exit_code
    capsys.readouterr()
    assert run("wait", name, "--start-timeout", "-1", *cluster) == BadInputError.exit_code
    assert "--start-timeout: must be >= 0, got -1.0" in capsys.readouterr().err


# ---- logs ----------------------------------------------------------------------------------
def test_logs_previous_and_every_launcher_attempt(api, submit_args, kubeconfig_path, capsys):
    cluster = ["--kubeconfig", kubeconfig_path]
    api.script(
        [
            (0.0, launcher_pod("a1", "attempt 1\nboom\n", phase="Failed")),
            (0.0, launcher_pod("b2", "attempt 2\n", previous_logs="before the restart\n")),
        ]
    )
    run(*submit_args)
    name = capsys.readouterr().out.strip()
    import time

    deadline = time.monotonic() + 10
    while len([k for k in api.objects if k[0] == "pods"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run("logs", name, *cluster) == 0
    assert capsys.readouterr().out == "attempt 2\n"
    assert run("logs", name, "--previous", *cluster) == 0
    assert capsys.readouterr().out == "before the restart\n"
    saved = Path(submit_args[-1].split("=", 1)[1]) / "all.log"
    assert run("logs", name, "--all-pods", "--save", str(saved), *cluster) == 0
    out = capsys.readouterr().out
    assert out == (
        f"===== launcher pod {name}-launcher-a1 (attempt 1 of 2) =====\nattempt 1\nboom\n"
        f"===== launcher pod {name}-launcher-b2 (attempt 2 of 2) =====\nattempt 2\n"
    )
    assert saved.read_text() == out
    assert run("logs", name, "--all-pods", "--previous", *cluster) == NotFoundError.exit_code
    assert "has no previous container" in capsys.readouterr().err


def test_logs_follow_prints_lines(api, submit_args, kubeconfig_path, capsys):
    api.script([(0.05, running("one\ntwo\n")), (0.1, succeeded())])
    run(*submit_args)
    name = capsys.readouterr().out.strip()
    assert run("logs", name, "--follow", "--timeout", "30", "--kubeconfig", kubeconfig_path) == 0
    assert capsys.readouterr().out == "one\ntwo\n"


# ---- list ----------------------------------------------------------------------------------
def test_list_has_a_header_and_wide_and_json_forms(api, submit_args, kubeconfig_path, capsys):
    cluster = ["--kubeconfig", kubeconfig_path]
    assert run("list", *cluster) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no MPIJobs or TrainJobs in namespace team-a" in err
    assert run("list", "-o", "json", *cluster) == 0
    assert json.loads(capsys.readouterr().out) == []
    api.script([(0.0, failed("boom"))])
    run(*submit_args, "--schedule", "nightly")
    name = capsys.readouterr().out.strip()
    import time

    deadline = time.monotonic() + 10
    while "status" not in api.objects[("mpijobs", "team-a", name)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run("list", *cluster) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "PHASE", "SCHEDULE", "CREATED"]
    assert row.split()[:3] == [name, "Failed", "nightly"]
    assert row.index("Failed") == header.index("PHASE")  # columns line up
    assert run("list", "-o", "wide", *cluster) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "NAME",
        "PHASE",
        "SCHEDULE",
        "CREATED",
        "COMPLETED",
        "REASON",
        "OUTPUT",
        "KIND",
    ]
    assert row.split()[5:] == [
        "BackoffLimitExceeded",
        str(Path(submit_args[-1].split("=", 1)[1]) / "runs" / name),
        "MPIJob",
    ]
    assert run("list", "-o", "json", *cluster) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["name"], doc["phase"], doc["schedule"]) == (name, "Failed", "nightly")
    assert doc["kind"] == "MPIJob"


def test_submit_follow_prints_the_launcher_log_then_the_summary(api, submit_args, capsys):
    api.script(
        [(0.05, running("epoch 1\nepoch 2\n")), (0.1, write_summary(0.9)), (0.15, succeeded())]
    )
    assert run(*submit_args, "--follow", "--timeout", "30") == 0
    out = capsys.readouterr().out
    log, summary = out.split("\n", 2)[:2], out.split("\n", 2)[2]
    assert log == ["epoch 1", "epoch 2"]
    assert json.loads(summary) == {"val_top1": 0.9}


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_start_timeouts_are_bad_input(api, submit_args, capsys, value):
    assert run(*submit_args, "--wait", "--start-timeout", value) == BadInputError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err.splitlines()[-1]]  # one line
    assert err.startswith("finetune-job: error: --start-timeout: must be")
    assert not api.objects  # nothing submitted


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
        (["--values", "DROP"], ExitCode.GATE_REFUSED),  # from the values, as the CronJob
        (["--max-class-drop", "0.2"], ExitCode.GATE_REFUSED),
        (["--values", "DROP", "--max-class-drop", "0"], 0),  # the flag wins
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
    drop = tmp_path / "drop.yaml"  # a values file: --set would make 0.2 a string
    drop.write_text("training:\n  max_class_drop: 0.2\n")
    flags = [str(drop) if f == "DROP" else f for f in flags]
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
