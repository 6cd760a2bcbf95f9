"""`helm package` makes a versioned .tgz without the test files; pushed to a real OCI registry
(Debian's docker-registry on loopback), it renders back as the chart in the repository does."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart_tools import API_VERSIONS, CHART, render, run_helm
from prometheus_tools import free_port

VALUES = {"training": {"data": "s3://bucket/ds", "output": "s3://bucket/runs/r1"}}


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def package(helm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run_helm(helm, "package", str(CHART), "--destination", str(out))
    meta = chart_meta()
    tgz = out / f"{meta['name']}-{meta['version']}.tgz"
    assert tgz.is_file(), list(out.iterdir())
    return tgz


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[str]:
    """Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1, no auth, its
    storage in a temporary folder; yields host:port once /v2/ answers."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip(
            "docker-registry is missing (Debian package docker-registry; `make test` installs it)"
        )
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    log = open(root / "registry.log", "wb")  # closed in the finally below
    proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                logged = (root / "registry.log").read_text()
                raise AssertionError(f"docker-registry exited: {logged}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError("docker-registry did not answer /v2/ in 30 s") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_package_is_versioned_and_leaves_test_files_out(package):
    meta = chart_meta()
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    prefix = meta["name"] + "/"
    assert {prefix + n for n in ("Chart.yaml", "values.yaml", "values.schema.json")} <= names
    assert prefix + "README.md" in names  # `helm show readme` works on the package
    assert not any(n.startswith(prefix + "ci/") for n in names)
    assert prefix + "files/alerts_test.yaml" not in names
    assert prefix + "files/alerts.yaml" in names


@pytest.mark.slow
def test_pushed_to_an_oci_registry_it_renders_back_as_the_repository_chart(
    helm, package, registry, tmp_path
):
    meta = chart_meta()
    run_helm(helm, "push", str(package), f"oci://{registry}/charts", "--plain-http")
    url = f"http://{registry}/v2/charts/{meta['name']}/tags/list"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert json.load(resp)["tags"] == [meta["version"]]
    ref = f"oci://{registry}/charts/{meta['name']}"
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(VALUES), encoding="utf-8")
    args = ["template", "ft", ref, "--version", meta["version"], "--plain-http"]
    args += ["--namespace", "ml", "--kube-version", "1.33.0", "-f", str(values_file)]
    for api in API_VERSIONS:
        args += ["--api-versions", api]
    from_registry = [d for d in yaml.safe_load_all(run_helm(helm, *args)) if d]
    assert from_registry == render(helm, VALUES)
    assert {d["kind"] for d in from_registry} >= {"MPIJob", "ConfigMap"}
    shown = run_helm(helm, "show", "readme", ref, "--version", meta["version"], "--plain-http")
    assert shown.strip() == (CHART / "README.md").read_text(encoding="utf-8").strip()
