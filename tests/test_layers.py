"""Layers point one way: deploy uses job, never the reverse; training runs without kubernetes."""

from __future__ import annotations

import ast
import json
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
    """Only the command line offers deploy's subcommands, importing deploy.cli when asked."""
    found = {
        p.name: deploy_imports(p) for p in sorted((ROOT / "job").glob("*.py")) if deploy_imports(p)
    }
    assert set(found) <= {"cli.py"}, found
    assert not [line for line, at_top in found.get("cli.py", []) if at_top]


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_KUBERNETES + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_every_job_module_imports_without_kubernetes():
    modules = [p.stem for p in sorted((ROOT / "job").glob("*.py")) if p.stem != "__init__"]
    result = run_python(
        "import importlib\n"
        f"for m in {modules!r}: importlib.import_module('job.' + m)\n"
        "import job.cli; job.cli.build_parser()\n"
        "print(sorted(m for m, mod in sys.modules.items()\n"
        "             if mod is not None and m.split('.')[0] in ('kubernetes', 'deploy')))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # deploy.cli and what it needs (manifest, errors) load for the parser, kubernetes never.
    loaded = json.loads(result.stdout.strip().replace("'", '"'))
    assert "deploy.client" not in loaded and not [m for m in loaded if m.startswith("kubernetes")]


def test_deploy_commands_without_kubernetes_say_what_to_install():
    result = run_python(
        "from job.cli import main\nsys.exit(main(['status', 'r1', '--kubeconfig', '/nope']))"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "finetune-job: error: status needs the [deploy] extra (no module 'kubernetes'): "
        "pip install 'finetune-job[deploy]'"
    )


def test_submit_help_needs_no_kubernetes():
    result = run_python("from job.cli import main\nmain(['submit', '--help'])")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--from-manifest FILE" in result.stdout


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
