"""`helm install` of every ci/ scenario into the real API server, and `helm uninstall`.

The API server judges each object as a cluster would: CRD structural schemas (pruning would
drop an unknown field silently, so the test compares what came back), strict field
validation, RBAC objects, admission webhooks (Kueue's). Uninstall leaves nothing of the
release behind, the objects the MPI Operator made from its MPIJob included (garbage
collection through ownerReferences).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tools import CHART, CI_VALUES, TRAINER_CRDS
from cluster_tools import Helm, eventually, install

from deploy import constants as c


@pytest.fixture(scope="module")
def trainer_crds(api: Any) -> None:
    """Kubeflow Trainer's CRDs (no controller: the cluster only admits TrainJobs)."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    ext = k8s.ApiextensionsV1Api(api)
    for path in TRAINER_CRDS.values():
        try:
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        except ApiException as e:
            assert e.status == 409, e.body


def _strict_dry_run(api: Any, doc: dict[str, Any], namespace: str) -> None:
    """Create ``doc`` with a server-side dry run and strict field validation."""
    from kubernetes import dynamic

    resource = dynamic.DynamicClient(api).resources.get(
        api_version=doc["apiVersion"], kind=doc["kind"]
    )
    ns = namespace if resource.namespaced else None
    resource.create(
        body=doc, namespace=ns, dry_run="All", query_params=[("fieldValidation", "Strict")]
    )


def _release_objects(api: Any, namespace: str, release: str) -> list[str]:
    """Every object in the namespace labelled with the release, or owned by one that is."""
    from kubernetes import dynamic

    client = dynamic.DynamicClient(api)
    found = []
    kinds = [
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("v1", "Service"),
        ("v1", "ServiceAccount"),
        ("v1", "Pod"),
        ("batch/v1", "Job"),
        ("batch/v1", "CronJob"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        (c.API_VERSION, c.KIND),
    ]
    for api_version, kind in kinds:
        for item in (
            client.resources.get(api_version=api_version, kind=kind).get(namespace=namespace).items
        ):
            meta = item.metadata
            labels = dict(meta.labels or {})
            if (
                labels.get(c.INSTANCE_LABEL) == release
                or meta.ownerReferences
                or release in meta.name
            ):
                if kind == "ConfigMap" and meta.name == "kube-root-ca.crt":
                    continue
                if kind == "ServiceAccount" and meta.name == "default":
                    continue
                found.append(f"{kind}/{meta.name}")
    return found


@pytest.mark.parametrize(
    "values_file", CI_VALUES, ids=lambda p: p.name.removesuffix("-values.yaml")
)
def test_every_scenario_installs_and_uninstalls_cleanly(
    values_file: Path, api: Any, helm: Helm, namespace: str, trainer_crds: None
) -> None:
    release = "r-" + values_file.name.removesuffix("-values.yaml")[:20]
    helm("install", release, str(CHART), "-n", namespace, "--dry-run=server", files=(values_file,))
    rendered = yaml_docs(
        helm("template", release, str(CHART), "-n", namespace, files=(values_file,))
    )
    for doc in rendered:
        _strict_dry_run(api, doc, namespace)

    made = install(helm, release, namespace, files=(values_file,))
    assert {(d["kind"], d["metadata"]["name"]) for d in made} == {
        (d["kind"], d["metadata"]["name"]) for d in rendered
    }
    for doc in made:
        _assert_admitted_unchanged(api, doc, namespace)

    helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = _release_objects(api, namespace, release)
        return not left

    try:
        eventually("the release's objects to go", nothing_left)
    except AssertionError:
        pytest.fail(f"left behind after helm uninstall: {left}")


def _assert_admitted_unchanged(api: Any, doc: dict[str, Any], namespace: str) -> None:
    """What the API server stored keeps every field of the rendered spec (none pruned)."""
    from kubernetes import dynamic

    resource = dynamic.DynamicClient(api).resources.get(
        api_version=doc["apiVersion"], kind=doc["kind"]
    )
    stored = resource.get(
        name=doc["metadata"]["name"], namespace=namespace if resource.namespaced else None
    ).to_dict()
    for key in ("spec", "data", "rules", "subjects", "roleRef"):
        if key in doc:
            missing = _missing_paths(doc[key], stored.get(key), key)
            assert not missing, (
                f"{doc['kind']}/{doc['metadata']['name']}: the API server dropped {missing}"
            )


def _missing_paths(rendered: Any, stored: Any, path: str) -> list[str]:
    """Paths present in ``rendered`` and absent from ``stored`` (defaults may add, never drop)."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [path]
        return [
            m for k, v in rendered.items() for m in _missing_paths(v, stored.get(k), f"{path}.{k}")
        ]
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [path]
        return [
            m
            for i, (a, b) in enumerate(zip(rendered, stored, strict=True))
            for m in _missing_paths(a, b, f"{path}[{i}]")
        ]
    return [] if stored is not None or rendered is None else [path]


def yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]
