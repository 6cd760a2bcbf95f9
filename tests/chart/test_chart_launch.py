"""The launcher really launches: the chart's rendered mpirun line and config file, run here.

The MPI Operator gives the launcher a hostfile of worker hosts (`<job>-worker-i.<job>.<ns>.svc
slots=N`) through OMPI_MCA_orte_default_hostfile; here every worker host is this machine.
"""

import json
import os
import subprocess

import pytest
import yaml
from chart_tools import (
    CONFIG_PATH,
    env_of,
    launcher_command_and_config,
    one,
    render,
    replica_container,
)

pytestmark = pytest.mark.slow


def test_rendered_launcher_command_trains_on_two_slots(helm, tiny_dataset, launch_env, tmp_path):
    out = tmp_path / "out"
    values = {
        "workers": {"replicas": 2},
        "slotsPerWorker": 1,
        "training": {
            "data": tiny_dataset,
            "output": str(out),
            "pretrained": "none",
            "head_lr_mult": 1.0,
            "image_size": 32,
            "batch_size": 8,
            "epochs": 2,
            "lr": 0.002,
            "metrics_port": 0,
        },
    }
    docs = render(helm, values)
    command, config_text = launcher_command_and_config(docs)
    assert command[:3] == ["mpirun", "-np", "2"]

    mpijob = one(docs, "MPIJob")
    assert mpijob["spec"]["slotsPerWorker"] == 1
    assert mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    # The operator's hostfile lists `<job>-worker-0...svc slots=1` and `-worker-1`; both
    # workers are this machine here.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    assert yaml.safe_load(config_text)["data"] == tiny_dataset

    env = dict(launch_env, OMPI_MCA_orte_default_hostfile=str(hostfile))
    for key, value in env_of(replica_container(mpijob, "Launcher")).items():
        if isinstance(value, str):  # plain values; secrets (valueFrom) are not rendered here
            env[key] = value
    argv = [str(config) if arg == CONFIG_PATH else arg for arg in command]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and len(summary["history"]) == 2
    assert summary["params_sha256_per_rank"][0] == summary["params_sha256_per_rank"][1]
    assert os.path.exists(out / "model-symbol.json")
