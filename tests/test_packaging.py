"""`pip install 'finetune-job[deploy]'` is the Kubernetes client alone: no MXNet, and yet
`finetune-job submit` works. A fresh venv from PyPI (pip's cache makes a rerun quick)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP_TIMEOUT = 900


def run(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_extras_split_training_from_the_client():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split("=")[0].split(">")[0].split("<")[0].split("[")[0].lower() for r in reqs}

    base, train, deploy = (
        names(project["dependencies"]),
        names(extras["train"]),
        names(extras["deploy"]),
    )
    assert {"mxnet", "numpy", "opencv-python-headless", "prometheus-client"} <= train
    assert not ({"mxnet", "numpy", "opencv-python-headless", "horovod"} & (base | deploy))
    assert {"kubernetes", "pyyaml", "boto3"} <= deploy
    assert "kubernetes" not in base | train


@pytest.mark.slow
def test_a_fresh_venv_with_only_deploy_submits_and_has_no_mxnet(tmp_path):
    # The package as the image's build context has it: pyproject.toml, README.md, job, deploy.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("job", "deploy"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    pip = run(
        python, "-m", "pip", "install", "--disable-pip-version-check", "-q", f"{src}[deploy]",
        timeout=PIP_TIMEOUT,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]

    for module in ("mxnet", "numpy", "cv2", "horovod", "prometheus_client"):
        probe = run(python, "-c", f"import {module}")
        assert probe.returncode != 0, f"{module} is installed with [deploy] alone"
        assert "ModuleNotFoundError" in probe.stderr
    assert run(python, "-c", "import kubernetes, yaml, boto3").returncode == 0

    helped = run(bin_dir / "finetune-job", "submit", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--from-manifest FILE" in helped.stdout

    # Training in that venv names the extra to install, in one line.
    trained = run(bin_dir / "finetune-job", "train", "--synthetic", "--output", tmp_path / "o")
    assert trained.returncode == 2
    assert re.fullmatch(
        r"finetune-job: error: train needs the \[train\] extra \(no module '(mxnet|numpy|cv2)'\): "
        r"pip install 'finetune-job\[train\]'",
        trained.stderr.strip(),
    ), trained.stderr
