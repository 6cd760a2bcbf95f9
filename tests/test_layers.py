"""Layers point one way: deploy uses job, never the reverse; the combined command line
(deploy.entry) sits above both. Training runs without kubernetes, and a client-only
install runs the command without MXNet."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run Python with the kubernetes package made unimportable, as in an image with only [train].
NO_KUBERNETES = "import sys; sys.modules['kubernetes'] = None\n"


def deploy_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of deploy in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        if any(n == "deploy" or n.startswith("deploy.") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_job_never_imports_deploy():
    """Not even lazily: the combined command line (deploy.entry) sits above both."""
    found = {
        str(p.relative_to(ROOT)): deploy_imports(p)
        for p in sorted((ROOT / "job").rglob("*.py"))
        if deploy_imports(p)
    }
    assert not found, found


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_KUBERNETES + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def job_modules() -> list[str]:
    return [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((ROOT / "job").rglob("*.py"))
    ]


def test_every_job_module_imports_without_kubernetes():
    result = run_python(
        "import importlib\n"
        f"for m in {job_modules()!r}: importlib.import_module(m)\n"
        "import job.cli; job.cli.build_parser()\n"
        "print(sorted(m for m, mod in sys.modules.items()\n"
        "             if mod is not None and m.split('.')[0] in ('kubernetes', 'deploy')))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().replace("'", '"')) == []


def test_deploy_commands_without_kubernetes_say_what_to_install():
    result = run_python(
        "from deploy.entry import main\nsys.exit(main(['status', 'r1', '--kubeconfig', '/nope']))"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "finetune-job: error: status needs the [deploy] extra (no module 'kubernetes'): "
        "pip install 'finetune-job[deploy]'"
    )


def test_submit_help_needs_no_kubernetes():
    result = run_python("from deploy.entry import main\nmain(['submit', '--help'])")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--from-manifest FILE" in result.stdout


# What only the [train] extra (and `make install`'s Horovod) brings: a client-only install
# (pip install '.[deploy]') has none of them.
TRAIN_ONLY = (
    "mxnet", "numpy", "cv2", "imagesize", "smart_open", "prometheus_client", "onnx",
    "onnxruntime", "matplotlib", "horovod",
)  # fmt: skip


@pytest.fixture(scope="module")
def client_only(tmp_path_factory) -> dict[str, str]:
    """The environment of a process in which no [train] module can be imported: a
    sitecustomize on PYTHONPATH blocks them before the command starts."""
    folder = tmp_path_factory.mktemp("client-only")
    (folder / "sitecustomize.py").write_text(
        f"import sys\nfor name in {TRAIN_ONLY!r}:\n    sys.modules[name] = None\n"
    )
    return {**os.environ, "PYTHONPATH": str(folder)}


def finetune_job(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed console script."""
    script = Path(sys.executable).parent / "finetune-job"
    return subprocess.run(
        [str(script), *argv], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


def test_client_only_install_blocks_every_train_module(client_only):
    result = subprocess.run(
        [sys.executable, "-c", "import mxnet"], capture_output=True, text=True, env=client_only
    )
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


@pytest.mark.parametrize(
    "argv, shows",
    [(["--help"], "submit"), (["submit", "--help"], "--from-manifest FILE")],
    ids=["help", "submit-help"],
)
def test_client_only_install_runs_the_command(client_only, argv, shows):
    result = finetune_job(client_only, *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shows in result.stdout and "train" in finetune_job(client_only, "--help").stdout


def test_client_only_install_names_the_extra_a_training_command_needs(client_only, tmp_path):
    result = finetune_job(client_only, "train", "--synthetic", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "finetune-job: error: train needs the [train] extra (no module 'mxnet'): "
        "pip install 'finetune-job[train]'"
    )


@pytest.mark.slow
def test_training_runs_without_kubernetes(tmp_path):
    out = tmp_path / "out"
    args = [
        "train", "--synthetic", "--synthetic-images", "16", "--synthetic-classes", "2",
        "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--pretrained", "none",
        "--metrics-port", "0", "--threads", "1", "--data-workers", "1", "--output", str(out),
    ]  # fmt: skip
    result = run_python(
        f"from job.cli import main\ncode = main({args!r})\n"
        "assert 'kubernetes' not in sys.modules or sys.modules['kubernetes'] is None\n"
        "sys.exit(code)",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
