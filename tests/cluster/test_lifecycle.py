"""A run's life on the real control plane, through the `finetune-job` command and the client.

The real MPI Operator turns the chart's MPIJob into a launcher Job and worker pods, the real
Job controller runs the launcher's attempts, the real scheduler places the pods on kwok's
nodes; kwok plays the containers (Running; exit 0; exit 1 for a launcher annotated to fail).
What the launcher's container would write (its log, summary.json) the test writes (Play).
Every state the command reports comes from the real controllers' conditions and events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_tools import (
    FAIL,
    HOLD,
    TRAINING,
    Play,
    eventually,
    install_release,
    submit_run,
    write_values,
)

from deploy import constants as c
from deploy.client import MPIJobClient
from deploy.errors import AlreadyExistsError, JobStuckError, NotFoundError
from job.exitcodes import ExitCode

FINETUNE_JOB = str(Path(sys.executable).parent / "finetune-job")


@pytest.fixture
def cli(kubeconfig: str, namespace: str, helm_binary: Path, tmp_path: Path) -> Any:
    """Run `finetune-job CMD ...` against the cluster, in the test's namespace."""

    def command(*args: str) -> list[str]:
        cmd, rest = args[0], args[1:]
        extra = ["--helm", str(helm_binary)] if cmd == "submit" else []
        return [FINETUNE_JOB, cmd, *rest, "--kubeconfig", kubeconfig, "-n", namespace, *extra]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return subprocess.run(
            command(*args), capture_output=True, text=True, timeout=timeout, env=env
        )

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    run.start = start  # type: ignore[attr-defined]
    return run


@pytest.fixture
def play(api: Any, namespace: str, tmp_path: Path) -> Play:
    return Play(api, namespace, tmp_path)


def values_file(tmp_path: Path, **extra: Any) -> Path:
    """Values of a held 2-worker run with its output in ``tmp_path``."""
    values: dict[str, Any] = {
        "training": {**TRAINING, "output": str(tmp_path / "flowers")},
        "workers": {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
        "podAnnotations": {HOLD: "true"},
    }
    values.update(extra)
    return write_values(tmp_path / "values.yaml", values)


@pytest.fixture
def release(helm: Any, namespace: str, tmp_path: Path) -> Any:
    """`helm install` of the chart without a run (its ServiceAccount, ...), as `submit` needs;
    the values file it was installed with."""

    def install(**extra: Any) -> Path:
        values = values_file(tmp_path, **extra)
        install_release(helm, namespace, values)
        return values

    return install


def the_run(api: Any, namespace: str) -> str:
    """The name of the one MPIJob in the namespace (waits for it)."""
    from kubernetes import client as k8s

    custom: Any = k8s.CustomObjectsApi(api)

    def names() -> list[str]:
        items = custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL)
        return [i["metadata"]["name"] for i in items["items"]]

    (name,) = eventually("the submitted MPIJob", names)
    return name


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_submit_wait_succeeds_then_status_logs_list_and_delete_say_so(
    cli: Any, release: Any, play: Play, api: Any, namespace: str, tmp_path: Path
) -> None:
    submit = cli.start(
        "submit", "-f", str(release()), "--wait", "--timeout", "180",
        "--min-accuracy", "0.5",
    )  # fmt: skip
    name = the_run(api, namespace)
    launcher = play.launcher(name)
    play.log(launcher, ["epoch=1 loss=0.91", "epoch=2 loss=0.47"])
    output = Path(play.output(name))
    output.mkdir(parents=True)
    (output / "summary.json").write_text(json.dumps({"val_top1": 0.9}))
    play.release(launcher)

    code, out, err = finish(submit)
    assert code == ExitCode.OK, err
    assert json.loads(out) == {"val_top1": 0.9}
    assert f"MPIJob {namespace}/{name}" in err
    latest = json.loads((tmp_path / "flowers" / "latest").read_text())
    assert latest["run"] == name and latest["val_top1"] == 0.9
    assert (output / "launcher.log").read_text() == "epoch=1 loss=0.91\nepoch=2 loss=0.47\n"

    status = cli("status", name, "-o", "json")
    assert status.returncode == ExitCode.OK and json.loads(status.stdout)["phase"] == "Succeeded"
    logs = cli("logs", name)
    assert logs.returncode == ExitCode.OK
    assert logs.stdout == "epoch=1 loss=0.91\nepoch=2 loss=0.47\n"
    listed = json.loads(cli("list", "-o", "json").stdout)
    assert [(r["name"], r["phase"]) for r in listed] == [(name, "Succeeded")]

    assert cli("delete", name).returncode == ExitCode.OK
    gone = cli("status", name)
    assert gone.returncode == ExitCode.BAD_INPUT
    assert f"{namespace}/{name} not found" in gone.stderr


def test_a_failing_launcher_fails_the_run_after_its_retries(
    cli: Any, release: Any, api: Any, namespace: str
) -> None:
    values = release(podAnnotations={FAIL: "true"}, runPolicy={"backoffLimit": 1})
    result = cli("submit", "-f", str(values), "--wait", "--timeout", "180")
    assert result.returncode == ExitCode.FAILED, result.stderr
    name = the_run(api, namespace)
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"finetune-job: error: MPIJob {namespace}/{name} Failed "
        "(BackoffLimitExceeded: Job has reached the specified backoff limit)"
    )
    assert "Traceback" not in result.stderr

    from kubernetes import client as k8s

    job = k8s.BatchV1Api(api).read_namespaced_job(name + "-launcher", namespace)
    assert job.spec.backoff_limit == 1
    assert job.status.failed == 2  # the first attempt and its one retry
    status = cli("status", name, "-o", "json")
    assert status.returncode == ExitCode.FAILED
    assert json.loads(status.stdout)["phase"] == "Failed"


def test_a_wait_that_times_out_leaves_a_run_its_deadline_stops(
    cli: Any, release: Any, api: Any, namespace: str
) -> None:
    """The submit gives the MPIJob its own --timeout as activeDeadlineSeconds, so a run whose
    waiter gave up cannot run on unwatched: the real controllers stop it."""
    result = cli("submit", "-f", str(release()), "--wait", "--timeout", "5")
    assert result.returncode == ExitCode.TIMED_OUT, result.stderr
    name = the_run(api, namespace)
    assert f"left running: MPIJob {namespace}/{name}" in result.stderr
    assert "activeDeadlineSeconds 5 stops it" in result.stderr

    def failed() -> Any:
        state = json.loads(cli("status", name, "-o", "json").stdout)
        return state if state["phase"] == "Failed" else None

    assert eventually("the deadline to stop the run", failed)["reason"] == "DeadlineExceeded"


def test_a_run_no_node_fits_fails_early_with_the_schedulers_reason(cli: Any, release: Any) -> None:
    too_big = {"replicas": 2, "resources": {"requests": {"cpu": "64", "memory": "1Gi"}}}
    values = release(workers=too_big)
    result = cli(
        "submit", "-f", str(values), "--wait", "--timeout", "180",
        "--unschedulable-timeout", "2",
    )  # fmt: skip
    assert result.returncode == JobStuckError.exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot start" in last and "Unschedulable" in last
    assert "Insufficient cpu" in last  # the real scheduler's own words


def test_a_missing_service_account_fails_early_naming_it(cli: Any, release: Any) -> None:
    values = release(serviceAccount={"create": False, "name": "nobody"})
    result = cli(
        "submit", "-f", str(values), "--wait", "--timeout", "180", "--start-timeout", "2",
    )  # fmt: skip
    assert result.returncode == JobStuckError.exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot start" in last and 'serviceaccount "nobody" not found' in last


def test_the_python_client_submits_waits_and_reads_the_log(
    kubeconfig: str, namespace: str, helm: Any, release: Any, play: Play
) -> None:
    client, run = submit_run(helm, namespace, kubeconfig, yaml.safe_load(release().read_text()))
    launcher = play.launcher(run.name)
    play.log(launcher, ["epoch=1", "epoch=2"])
    lines = list(client.logs(run.name))
    assert lines == ["epoch=1", "epoch=2"]
    play.release(launcher)
    seen: list[str] = []
    state = client.wait(run.name, timeout=120, on_change=lambda s: seen.append(s.phase))
    assert state.succeeded
    assert seen.count("Succeeded") <= 1
    client.delete(run.name)


@pytest.fixture
def held(kubeconfig: str, namespace: str, helm: Any, release: Any) -> tuple[MPIJobClient, Any]:
    """A client, and a submitted run of the installed release whose launcher is held."""
    values = yaml.safe_load(release().read_text())
    return submit_run(helm, namespace, kubeconfig, values)


def test_a_second_submit_of_a_run_is_refused_as_already_existing(
    held: tuple[MPIJobClient, Any], namespace: str
) -> None:
    client, run = held
    with pytest.raises(AlreadyExistsError, match=f"{namespace}/{run.name} already exists") as info:
        client.submit(run.job, run.config_map)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    assert info.value.__cause__ is not None and info.value.__cause__.status == 409


@pytest.mark.parametrize("call", ["status", "wait", "logs", "delete"])
def test_an_unknown_run_is_not_found(client: MPIJobClient, namespace: str, call: str) -> None:
    args = {"wait": (5.0,)}.get(call, ())
    with pytest.raises(NotFoundError, match=f"{namespace}/nope"):
        getattr(client, call)("nope", *args)


def test_a_run_deleted_while_waiting_ends_the_wait(
    held: tuple[MPIJobClient, Any], play: Play, namespace: str
) -> None:
    import threading

    client, run = held
    play.launcher(run.name)
    failure: list[BaseException] = []
    watching = threading.Event()

    def wait() -> None:
        try:
            client.wait(run.name, timeout=120, on_change=lambda s: watching.set())
        except NotFoundError as e:
            failure.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert watching.wait(120), "the wait never saw the run"
    client.delete(run.name)
    waiter.join(150)
    assert not waiter.is_alive()
    assert [str(e) for e in failure] == [f"MPIJob {namespace}/{run.name} was deleted while waiting"]
