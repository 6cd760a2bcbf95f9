"""One exit-code table: job.exitcodes, documented once in the README, used by every command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from job.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_exit_rows() -> list[tuple[int, str, str]]:
    section = README.split("### Exit codes\n", 1)[1].split("\n#", 1)[0]
    return [
        (int(code), name, meaning)
        for code, name, meaning in re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", section, re.M)
    ]


def test_the_readme_table_is_the_module():
    assert readme_exit_rows() == [(int(e), e.name, e.meaning) for e in ExitCode]


def test_the_readme_has_no_other_exit_code_table():
    tables = re.findall(r"^\| (?:code|exit) \|", README, re.M)
    assert len(tables) == 1


def test_every_error_carries_a_code_of_the_table():
    from deploy import errors as deploy_errors
    from job import errors as job_errors
    from job import storage

    kinds = [
        obj
        for module in (job_errors, deploy_errors, storage)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, job_errors.JobError)
    ]
    assert len(kinds) > 10
    for kind in kinds:
        assert isinstance(kind.exit_code, ExitCode), kind


@pytest.mark.parametrize("package", ["job", "deploy"])
def test_no_command_returns_a_bare_number(package):
    """Commands return ExitCode members; no module keeps EXIT_* constants of its own."""
    found = []
    for path in sorted((ROOT / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.startswith("EXIT") for t in node.targets
            ):
                found.append(f"{path.name}:{node.lineno} defines an EXIT constant")
            if (
                isinstance(node, ast.Return)
                and isinstance(node.value, ast.Constant)
                and type(node.value.value) is int
                and path.name in ("cli.py", "commands.py")
            ):
                found.append(f"{path.name}:{node.lineno} returns {node.value.value}")
    assert found == []


def test_deploy_and_job_agree_on_bad_input():
    from deploy.errors import BadInputError, NotFoundError
    from job.errors import InputError

    assert BadInputError.exit_code == NotFoundError.exit_code == InputError.exit_code
    assert issubclass(BadInputError, InputError)
