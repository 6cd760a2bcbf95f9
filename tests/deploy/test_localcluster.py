"""The local cluster's own logic, without starting it: the throwaway Go module, the one-line
errors of a build that cannot happen, the kwok stages' annotations, the restart loop."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deploy.localcluster import build, cluster, components, images, node, processes
from job.exitcodes import ExitCode


def test_the_go_module_replaces_every_staging_module_with_the_release():
    text = build.go_mod(["k8s.io/api", "k8s.io/client-go"])
    version = components.staging_version()
    assert version == "v0." + components.KUBERNETES.removeprefix("v1.")
    assert f"\tk8s.io/api => k8s.io/api {version}\n" in text
    assert f"\tk8s.io/client-go => k8s.io/client-go {version}\n" in text


def test_the_binaries_report_the_pinned_kubernetes_version():
    flags = build.ldflags()
    assert f"version.gitVersion={components.KUBERNETES}" in flags
    major, minor = components.KUBERNETES.removeprefix("v").split(".")[:2]
    assert f"gitMajor={major}" in flags and f"gitMinor={minor}" in flags


def test_the_cache_folder_changes_with_any_pinned_version(monkeypatch):
    before = components.cache_key()
    bumped = tuple(
        components.Component(c.name, c.module, c.version + "-next", c.package, c.standalone)
        if c.name == "kueue"
        else c
        for c in components.COMPONENTS
    )
    monkeypatch.setattr(components, "COMPONENTS", bumped)
    assert components.cache_key() != before


@pytest.mark.parametrize(
    ("output", "line"),
    [
        (
            '"Error": "k8s.io/kubernetes@v1.35.4: reading http://proxy/k8s.io/kubernetes/@v/'
            'v1.35.4.info: 403 Forbidden"',
            "the Go module proxy does not serve k8s.io/kubernetes@v1.35.4 (403 Forbidden)",
        ),
        (
            "go: module github.com/kubeflow/mpi-operator/cmd/mpi-operator: reading https://proxy/"
            "github.com/kubeflow/mpi-operator/cmd/mpi-operator/@v/list: 403 Forbidden\n"
            "\tserver response: This module version is not available.",
            "the Go module proxy does not serve github.com/kubeflow/mpi-operator/cmd/mpi-operator "
            "(403 Forbidden)",
        ),
        ("some/pkg/x.go:3:1: undefined: y\n", "go build failed: some/pkg/x.go:3:1: undefined: y"),
    ],
    ids=["refused-version", "refused-module", "compile-error"],
)
def test_a_failed_go_command_is_one_line_naming_what(output, line):
    assert build.explain(output, "go build", Path("/c/build.log")).startswith(line)


def run_build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.localcluster", "build"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_go_the_build_says_so_in_one_line(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin", LOCAL_CLUSTER_CACHE=str(tmp_path))
    done = run_build(env)
    assert done.returncode == ExitCode.FAILED
    assert done.stderr.strip().splitlines() == [
        "error: go is not on PATH: the local cluster is built from Go modules (Go 1.25 or newer)"
    ]


@pytest.fixture
def refusing_proxy() -> Iterator[str]:
    """A Go module proxy that refuses every module, as the real one refuses some."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"This module version is not available.")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_module_the_proxy_refuses_is_named_in_one_line(tmp_path, refusing_proxy):
    env = dict(
        os.environ,
        LOCAL_CLUSTER_CACHE=str(tmp_path / "cache"),
        GOMODCACHE=str(tmp_path / "mod"),
        GOPROXY=refusing_proxy,
        GOSUMDB="off",
    )
    done = run_build(env)
    assert done.returncode == ExitCode.FAILED
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"error: the Go module proxy does not serve k8s.io/kubernetes@{components.KUBERNETES} "
        "(403 Forbidden)"
    )


def test_the_kwok_stages_read_the_annotations_the_tests_set():
    stages = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all(cluster.kwok_stages().read_text())
    }
    assert set(stages) == {"pod-ready", "pod-complete", "pod-fail", "pod-delete"}

    def keys(stage: str) -> str:
        return yaml.safe_dump(stages[stage]["spec"]["selector"])

    assert cluster.HOLD_ANNOTATION in keys("pod-complete")
    assert cluster.FAIL_ANNOTATION in keys("pod-complete")
    assert cluster.HOLD_ANNOTATION in keys("pod-fail")
    assert stages["pod-fail"]["spec"]["selector"]["matchAnnotations"] == {
        cluster.FAIL_ANNOTATION: "true"
    }


def test_a_controller_that_exits_is_started_again_and_stop_ends_it(tmp_path):
    proc = processes.start(tmp_path, "flaky", ["/bin/sh", "-c", "echo ran; exit 3"], restart=True)
    try:
        deadline = time.monotonic() + 30
        while proc.log_file.read_text().count("ran") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.log_file.read_text().count("ran") >= 2
        assert "exited with 3; restarting in 1 s" in proc.log_file.read_text()
        assert proc.alive()
    finally:
        processes.stop(proc)
    assert not proc.alive() and not proc.pid_file.exists()


def test_a_stopped_process_is_not_taken_for_a_new_one_with_its_pid(tmp_path):
    proc = processes.start(tmp_path, "sleeper", ["sleep", "30"])
    assert proc.alive()
    (tmp_path / "pids" / "sleeper.program").write_text("something-else")
    assert not proc.alive()  # the pid runs another program: not ours
    (tmp_path / "pids" / "sleeper.program").write_text("sleep")
    processes.stop(proc)
    assert not proc.alive()


def test_the_readme_lists_the_pinned_versions():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert components.render_readme(readme) == readme, (
        "README.md's versions table is stale: run `python -m deploy.localcluster readme`"
    )
    assert f"| kube-apiserver | `k8s.io/kubernetes` | {components.KUBERNETES} |" in readme


def test_the_coredns_main_links_only_the_corefiles_plugins():
    main = build.WRITTEN_MAINS["coredns"]
    linked = re.findall(r'"github.com/coredns/coredns/plugin/(\w+)"', main)
    assert tuple(linked) == components.COREDNS_PLUGINS
    text = node.corefile(Path("/kubeconfig"), 8181)
    # a server block's first-level lines are its plugins (the kubernetes block's own are not)
    used = {line.split()[0] for line in text.splitlines() if re.match(r"^    \w", line)}
    assert used == set(components.COREDNS_PLUGINS)


def test_the_pause_image_is_one_layer_with_the_pause_program(tmp_path):
    program = tmp_path / "pause"
    program.write_bytes(b"\x7fELF pause")
    archive = images.pause_archive(program, tmp_path)
    with tarfile.open(archive) as tar:
        (manifest,) = json.loads(tar.extractfile("manifest.json").read())
        config = json.loads(tar.extractfile(manifest["Config"]).read())
        layer = tar.extractfile(manifest["Layers"][0]).read()
    assert manifest["RepoTags"] == [images.PAUSE_IMAGE]
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("pause")
        assert member.mode == 0o755 and tar.extractfile(member).read() == b"\x7fELF pause"


def test_a_node_without_containerd_fails_in_one_line_naming_the_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(node.shutil, "which", lambda tool: None)
    monkeypatch.setattr(node, "CNI_BIN", str(tmp_path / "no-cni"))
    with pytest.raises(processes.ClusterError) as e:
        node.start(cluster.Cluster(tmp_path, cluster.Ports.free(), True), {})
    assert str(e.value) == (
        "the real node needs Debian's containerd containernetworking-plugins runc: "
        "apt-get install containerd containernetworking-plugins runc"
    )
