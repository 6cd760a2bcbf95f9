"""The chart's RBAC as the real authorizer judges it (SubjectAccessReview).

The scheduled submit's ServiceAccount may do what `finetune-job submit --wait` needs in its
own namespace and nothing else: no Secrets, no changes to any MPIJob (deleting only with
cronJob.deleteAfter), nothing in another namespace. The training pods' ServiceAccount has
no API access at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_tools import TRAINING, Helm, install, token_kubeconfig, write_values

from deploy import constants as c
from job.exitcodes import ExitCode

Rule = tuple[str, str, str, str]  # verb, API group, resource, subresource
SUBMIT_NEEDS: list[Rule] = [
    ("create", c.GROUP, "mpijobs", ""),
    ("get", c.GROUP, "mpijobs", ""),
    ("list", c.GROUP, "mpijobs", ""),
    ("watch", c.GROUP, "mpijobs", ""),
    ("create", "", "configmaps", ""),
    ("get", "", "pods", ""),
    ("list", "", "pods", ""),
    ("watch", "", "pods", ""),
    ("get", "", "pods", "log"),
    ("list", "", "events", ""),
    ("watch", "", "events", ""),
]
NOBODY_NEEDS: list[Rule] = [
    ("update", c.GROUP, "mpijobs", ""),
    ("patch", c.GROUP, "mpijobs", ""),
    ("delete", c.GROUP, "mpijobs", ""),
    ("get", "", "secrets", ""),
    ("list", "", "secrets", ""),
    ("create", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("update", "", "configmaps", ""),
    ("create", "rbac.authorization.k8s.io", "rolebindings", ""),
    ("create", "", "serviceaccounts", "token"),
]


def allowed(api: Any, account: str, rule: Rule, namespace: str, where: str) -> bool:
    """May ``namespace``'s ServiceAccount ``account`` do ``rule`` in namespace ``where``?"""
    from kubernetes import client as k8s

    verb, group, resource, sub = rule
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
    attributes = {"namespace": where, "verb": verb, "group": group, "resource": resource}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{namespace}:{account}",
            "groups": [*groups, "system:authenticated"],
            "resourceAttributes": {**attributes, "subresource": sub},
        },
    }
    auth: Any = k8s.AuthorizationV1Api(api)
    return bool(auth.create_subject_access_review(review).status.allowed)


def accounts(made: list[dict[str, Any]]) -> tuple[str, str]:
    """(the submit ServiceAccount or "" without a schedule, the training pods' one) of an
    installed release."""
    sas = {d["metadata"]["name"]: d for d in made if d["kind"] == "ServiceAccount"}
    submit = [
        n for n, d in sas.items() if d["metadata"]["labels"].get(c.COMPONENT_LABEL) == "submit"
    ]
    (job,) = set(sas) - set(submit)
    return (submit or [""])[0], job


@pytest.fixture
def other_namespace(api: Any, namespace: str) -> Any:
    from kubernetes import client as k8s

    core: Any = k8s.CoreV1Api(api)
    name = namespace + "-other"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.mark.parametrize("delete_after", [False, True], ids=["default", "deleteAfter"])
def test_the_submit_account_can_do_its_job_here_and_nothing_more(
    api: Any, helm: Helm, namespace: str, other_namespace: str, delete_after: bool
) -> None:
    values = {
        "training": TRAINING,
        "schedule": "0 3 * * 0",
        "runOnInstall": False,
        "cronJob": {"deleteAfter": delete_after},
    }
    submit, _ = accounts(install(helm, "rb", namespace, values=values))

    def can(rule: Rule, where: str = namespace) -> bool:
        return allowed(api, submit, rule, namespace, where)

    assert [r for r in SUBMIT_NEEDS if not can(r)] == []
    allowed_here = [r for r in NOBODY_NEEDS if can(r)]
    assert allowed_here == ([("delete", c.GROUP, "mpijobs", "")] if delete_after else [])
    assert [r for r in SUBMIT_NEEDS + NOBODY_NEEDS if can(r, other_namespace)] == []


def test_the_training_pods_account_has_no_api_access(api: Any, helm: Helm, namespace: str) -> None:
    made = install(helm, "tr", namespace, values={"training": TRAINING, "schedule": "0 3 * * 0"})
    _, job = accounts(made)
    granted = [r for r in SUBMIT_NEEDS + NOBODY_NEEDS if allowed(api, job, r, namespace, namespace)]
    assert granted == []
    mpijob = next(d for d in made if d["kind"] == c.KIND)
    for replica in mpijob["spec"]["mpiReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["serviceAccountName"] == job
        assert pod["automountServiceAccountToken"] is False  # no token in the pods at all


def test_an_identity_without_rights_gets_one_line_naming_the_verb_and_exit_2(
    api: Any, helm: Helm, namespace: str, helm_binary: Path, tmp_path: Path
) -> None:
    """`finetune-job` as the training pods' ServiceAccount (a real token, real RBAC)."""
    values = {"training": TRAINING}
    _, job = accounts(install(helm, "nr", namespace, values={**values, "runOnInstall": False}))
    kubeconfig = token_kubeconfig(api, namespace, job, tmp_path)
    values_file = write_values(tmp_path / "values.yaml", values)
    cli = [str(Path(sys.executable).parent / "finetune-job")]
    where = ["--kubeconfig", kubeconfig, "-n", namespace]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}

    submit = [*cli, "submit", "-f", str(values_file), "--helm", str(helm_binary), *where]
    done = subprocess.run(submit, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == ExitCode.BAD_INPUT
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"finetune-job: error: permission denied: cannot create {c.PLURAL}.")
    assert f'User "system:serviceaccount:{namespace}:{job}" cannot create' in last

    status = subprocess.run(
        [*cli, "status", "any", *where], capture_output=True, text=True, timeout=60, env=env
    )
    assert status.returncode == ExitCode.BAD_INPUT
    assert "permission denied: cannot get" in status.stderr
    assert "Traceback" not in done.stderr + status.stderr
