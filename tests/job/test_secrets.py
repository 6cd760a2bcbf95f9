"""Secrets never leave their Secret: the Pushgateway's basic-auth credentials come from
mounted files, URLs with user:password@ are refused at start, and a planted secret shows up
in no output of a run (stderr, summary.json, checkpoints, the rendered chart)."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_tools import binary, free_port, stop, wait_for

from job import config as job_config

SECRET = "pl4nted-S3cret-7f3a"  # the needle every output is searched for
USER = "pusher"


@pytest.mark.parametrize("key", job_config.URL_KEYS)
@pytest.mark.parametrize(
    "value",
    [f"http://{USER}:{SECRET}@127.0.0.1:9091", f"s3://{USER}:{SECRET}@bucket/x"],
    ids=["http", "s3"],
)
def test_userinfo_in_any_url_key_is_refused_in_one_line(key, value, capsys):
    from job.cli import main

    args = ["train", "--synthetic", "--output", "/tmp/never-written"]
    args += [f"--{key.replace('_', '-')}", value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{key}'" in err and "credentials" in err
    assert SECRET not in err


def test_a_url_with_an_at_sign_in_its_path_is_not_userinfo():
    cfg = job_config.Config(synthetic=True, output="s3://bucket/runs/a@b", pushgateway="")
    assert cfg.output.endswith("a@b")


def test_username_and_password_files_go_together():
    with pytest.raises(job_config.ConfigError, match="go together"):
        job_config.Config(synthetic=True, output="x", pushgateway_username_file="/f")


def test_a_missing_credentials_file_fails_naming_the_file(tmp_path):
    from job.errors import InputError
    from job.training.metrics import read_basic_auth

    with pytest.raises(InputError, match=str(tmp_path / "nope")):
        read_basic_auth(str(tmp_path / "nope"), str(tmp_path / "nope"))


@contextmanager
def auth_pushgateway(tmp: Path) -> Iterator[str]:
    """A real Pushgateway that demands basic auth (its --web.config.file, bcrypt hash), with
    its own persistence file (Debian's default file is shared by every Pushgateway here)."""
    import bcrypt

    port = free_port()
    web = tmp / "web.yml"
    hashed = bcrypt.hashpw(SECRET.encode(), bcrypt.gensalt(rounds=4)).decode()
    web.write_text(yaml.safe_dump({"basic_auth_users": {USER: hashed}}))
    args = [
        binary("prometheus-pushgateway"),
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.config.file={web}",
        f"--persistence.file={tmp / 'pushgateway.db'}",
    ]
    with open(tmp / "pushgateway.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp / "pushgateway.log").read_text()
        return bool(fetch(base + "/-/ready"))

    try:
        wait_for("the pushgateway", ready, timeout=20)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            fetch(base + "/-/ready", auth=False)  # it is ours, and it demands the password
        yield base
    finally:
        stop(proc)


def fetch(url: str, auth: bool = True) -> str:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def train(launch_env, out: Path, pushgateway: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        *("finetune-job", "train", "--synthetic", "--pretrained", "none"),
        *("--model", "resnet18_v1", "--synthetic-images", "16", "--batch-size", "8"),
        *("--epochs", "2", "--image-size", "32", "--metrics-port", "0"),
        *("--pushgateway", pushgateway, "--output", str(out), *extra),
    ]
    return subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)


def every_file(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(root) for f in files]


@pytest.mark.slow
def test_the_push_authenticates_from_files_and_no_output_holds_the_secret(launch_env, tmp_path):
    (tmp_path / "username").write_text(USER + "\n")
    (tmp_path / "password").write_text(SECRET + "\n")
    with auth_pushgateway(tmp_path) as pgw:
        # Without credentials the Pushgateway refuses the push: the auth is real.
        bare = train(launch_env, tmp_path / "bare", pgw)
        assert bare.returncode == 0, bare.stderr
        assert "push failed" in bare.stderr
        assert 'job="finetune-job"' not in fetch(pgw + "/metrics")

        out = tmp_path / "out"
        done = train(
            launch_env,
            out,
            pgw,
            *("--pushgateway-username-file", str(tmp_path / "username")),
            *("--pushgateway-password-file", str(tmp_path / "password")),
        )
        assert done.returncode == 0, done.stderr
        assert "push failed" not in done.stderr
        pushed = fetch(pgw + "/metrics")
        assert 'finetune_last_success_timestamp_seconds{instance="",job="finetune-job"' in pushed
    files = every_file(out)
    assert any(p.name == "summary.json" for p in files)
    assert any("checkpoints" in p.parts for p in files)
    assert SECRET not in done.stdout + done.stderr
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
