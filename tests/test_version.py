"""The version is written once, in pyproject.toml; every other place that names it agrees."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_chart_version_and_app_version_are_the_package_version():
    chart = yaml.safe_load((ROOT / "charts" / "finetune-job" / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (VERSION, VERSION), (
        "set version and appVersion in charts/finetune-job/Chart.yaml to pyproject.toml's "
        f"version {VERSION}"
    )


def test_dockerfile_default_version_is_the_package_version():
    (default,) = re.findall(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert default == VERSION


def test_the_package_reports_the_installed_version():
    import job

    assert job.__version__ == VERSION
