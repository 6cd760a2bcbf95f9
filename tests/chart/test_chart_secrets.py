"""The chart keeps the Pushgateway's credentials in their Secret: mounted into the workers,
named by file in the environment, never copied into values, ConfigMaps or commands."""

from __future__ import annotations

import subprocess

import yaml
from chart_tools import CHART, launcher_command_and_config, render, run_helm

SECRET = "pl4nted-S3cret-7f3a"
USER = "pusher"


def test_the_chart_mounts_the_pushgateway_secret_and_copies_nothing_of_it(helm):
    values = {
        "training": {"output": "s3://b/o", "synthetic": True, "pushgateway": "http://pgw:9091"},
        "metrics": {"pushgatewayAuth": {"existingSecret": "pgw-auth", "passwordKey": "pw"}},
        "schedule": "0 3 * * 0",
    }
    docs = render(helm, values)
    mpijob = next(d for d in docs if d["kind"] == "MPIJob")
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    volume = next(v for v in worker["volumes"] if v["name"] == "pushgateway-auth")
    assert volume["secret"]["secretName"] == "pgw-auth"
    assert {i["key"] for i in volume["secret"]["items"]} == {"username", "pw"}
    assert "pushgateway-auth" not in {v["name"] for v in launcher["volumes"]}
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    mount = next(
        m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "pushgateway-auth"
    )
    assert env["FINETUNE_PUSHGATEWAY_PASSWORD_FILE"] == mount["mountPath"] + "/password"
    # The launcher forwards the file names to every rank.
    command, _ = launcher_command_and_config(docs)
    assert "FINETUNE_PUSHGATEWAY_USERNAME_FILE" in command


def test_the_chart_refuses_a_pushgateway_url_with_credentials(helm, tmp_path):
    values = tmp_path / "v.yaml"
    pgw = f"http://{USER}:{SECRET}@pgw:9091"
    training = {"output": "o", "synthetic": True, "pushgateway": pgw}
    values.write_text(yaml.safe_dump({"training": training}))
    proc = subprocess.run(
        [str(helm), "template", "ft", str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "pushgateway" in proc.stderr
    assert SECRET not in proc.stdout
    training["pushgateway"] = "http://pgw:9091/a@b"  # an @ in the path is no userinfo
    values.write_text(yaml.safe_dump({"training": training}))
    run_helm(helm, "template", "ft", str(CHART), "-f", str(values))
