"""A Helm-rendered MPIJob or TrainJob -> one run of it: the patcher behind ``finetune-job submit``.

The chart is the only description of the MPIJob; nothing here knows its values. ``submit``
starts from what Helm rendered (the MPIJob and the ConfigMap holding its ``config.yaml``):

- the chart's CronJob mounts them as ``manifest.yaml`` (``templates/_run.tpl``, the same
  templates a ``helm install`` renders);
- ``--from-manifest FILE`` reads ``helm template`` (or ``helm get manifest``) output;
- ``--values``/``--set`` run ``helm template`` on the chart first (``render``).

``build_run`` then changes only what belongs to one run:

- the name, ``<prefix>-<UTC yyyymmdd-hhmmss>-<4 random>`` (``job.outputs.registry.run_name``);
- labels ``finetune-job/run`` and ``finetune-job/schedule`` on the MPIJob and its pods, and
  ``app.kubernetes.io/managed-by: finetune-job-deploy`` (Helm does not manage the run);
- its output, ``<training.output>/runs/<name>`` (annotation ``finetune-job/output``);
- its own ConfigMap ``<name>-training``: the rendered ``config.yaml`` with that output (and
  ``pretrained`` resolved from ``latest``), validated by ``job.config``; the pods mount it,
  and their ``checksum/config`` is its hash. ``MPIJobClient.submit`` creates it owned by the
  MPIJob (ownerReferences), so it is garbage-collected with it, and a run keeps the config it
  started with even when the release's values change later.

A TrainJob (``launch.kind: TrainJob``) references the release's TrainingRuntime, whose pods
mount the release's ConfigMap. A TrainJob sets the launcher's arguments with
``spec.trainer.args`` (the replicated job of the trainer step); its ``runtimePatches`` could
swap volumes too, but how Trainer merges a same-named volume is unverified here. So a
TrainJob run gets no ConfigMap of its own: its ``spec.trainer.args`` are the runtime's
mpirun line plus ``--output`` (and ``--pretrained``/``--resume-from`` when set), flags that
win over the config file. The TrainingRuntime must be installed (``helm install`` with
``launch.kind=TrainJob``); ``helm template`` output supplies its launcher line.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy import constants as c
from deploy import kinds
from deploy.errors import BadInputError
from job import config as config_mod
from job import sources
from job.outputs import registry

CHART = "finetune-job"
CONFIG_MAP_SUFFIX = "-training"
# The key of the submit ConfigMap (templates/submit-configmap.yaml) that holds the manifest.
MANIFEST_KEY = "manifest.yaml"
HELM_TIMEOUT_SECONDS = 120
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Rendered:
    """The run Helm rendered (an MPIJob, or a TrainJob with its TrainingRuntime) and the
    ConfigMap its pods mount ``config.yaml`` from."""

    job: dict[str, Any]
    config_map: dict[str, Any]
    source: str
    runtime: dict[str, Any] | None = None  # a TrainJob's TrainingRuntime

    @property
    def training(self) -> dict[str, Any]:
        """The rendered ``config.yaml`` (the chart's ``training`` values)."""
        where = f"{self.source}: ConfigMap {self.config_map['metadata']['name']}"
        text = (self.config_map.get("data") or {}).get(c.CONFIG_KEY)
        if not isinstance(text, str):
            raise BadInputError(f"{where} has no {c.CONFIG_KEY}")
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise BadInputError(f"{where}: {c.CONFIG_KEY} is not valid YAML") from e
        if not isinstance(doc, dict):
            raise BadInputError(f"{where}: {c.CONFIG_KEY} must hold a mapping of config keys")
        return doc


# ---- reading what Helm rendered -------------------------------------------------------------
def parse(text: str, source: str) -> Rendered:
    """The MPIJob and its config ConfigMap in multi-document YAML (``helm template`` output).

    Other objects (Service, ServiceAccount, ...) are ignored. Without an MPIJob (a release
    rendered with ``runOnInstall=false``), the submit ConfigMap's manifest is used.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(f"{source} is not valid YAML: {first}") from e
    if not all(isinstance(d, dict) for d in docs):
        raise BadInputError(f"{source}: every YAML document must be a Kubernetes object")
    wanted = {(k.name, k.api_version) for k in kinds.KINDS}
    jobs = [d for d in docs if (d.get("kind"), d.get("apiVersion")) in wanted]
    if not jobs:
        inner = [
            d["data"][MANIFEST_KEY]
            for d in docs
            if d.get("kind") == "ConfigMap" and MANIFEST_KEY in (d.get("data") or {})
        ]
        if len(inner) == 1:
            return parse(inner[0], f"{source} ({MANIFEST_KEY})")
        raise BadInputError(
            f"{source} holds no {c.API_VERSION} {c.KIND} or {kinds.TRAINJOB.api_version} "
            f"{kinds.TRAINJOB.name} (rendered by the chart?)"
        )
    if len(jobs) > 1:
        names = ", ".join(f"{j['kind']} {j.get('metadata', {}).get('name')}" for j in jobs)
        raise BadInputError(f"{source} holds {len(jobs)} runs ({names}); submit takes one")
    job = jobs[0]
    runtime = None
    if kinds.of(job) is kinds.TRAINJOB:
        runtime = _runtime_of(job, docs, source)
    name = config_map_name(runtime or job, source)
    maps = [
        d
        for d in docs
        if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == name
    ]
    if not maps:
        raise BadInputError(f"{source} lacks the ConfigMap {name} that the {job['kind']} mounts")
    return Rendered(job=job, config_map=maps[0], source=source, runtime=runtime)


def _runtime_of(trainjob: Mapping[str, Any], docs: list[dict[str, Any]], source: str) -> dict:
    ref = (trainjob.get("spec") or {}).get("runtimeRef") or {}
    for d in docs:
        if d.get("kind") == ref.get("kind", kinds.RUNTIME_KIND) and (d.get("metadata") or {}).get(
            "name"
        ) == ref.get("name"):
            return d
    raise BadInputError(
        f"{source}: the TrainJob references {ref.get('kind')} {ref.get('name')}, which is not "
        "in it (render the chart with launch.kind=TrainJob)"
    )


def _launcher_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The launcher's pod spec: an MPIJob's Launcher replica, a TrainingRuntime's launcher job."""
    if obj.get("kind") == kinds.RUNTIME_KIND:
        for replicated in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            if replicated["name"] == kinds.TRAINJOB.launcher_role:
                pod: dict[str, Any] = replicated["template"]["spec"]["template"]["spec"]
                return pod
        raise KeyError(kinds.TRAINJOB.launcher_role)
    pod = obj["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    return pod


def config_map_name(job: Mapping[str, Any], source: str) -> str:
    """The ConfigMap the launcher mounts at ``CONFIG_DIR`` (where ``--config`` points)."""
    try:
        pod = _launcher_pod(job)
        (container,) = pod["containers"][:1]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == c.CONFIG_DIR)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        return str(volume["configMap"]["name"])
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise BadInputError(
            f"{source}: the {job.get('kind')}'s launcher mounts no ConfigMap at {c.CONFIG_DIR}"
        ) from e


def read(path: str) -> Rendered:
    """``parse`` of a file (``-``: standard input)."""
    try:
        if path == "-":
            return parse(sys.stdin.read(), "standard input")
        return parse(Path(path).read_text(encoding="utf-8"), path)
    except OSError as e:
        raise BadInputError(f"manifest {path}: {e.strerror}") from e


def default_chart() -> str:
    """The chart next to the package in a source checkout; empty when installed elsewhere."""
    chart = Path(__file__).resolve().parents[1] / "charts" / CHART
    return str(chart) if (chart / "Chart.yaml").is_file() else ""


def render(
    chart: str,
    release: str,
    values: Sequence[str] = (),
    sets: Sequence[str] = (),
    namespace: str | None = None,
    helm: str = "helm",
) -> Rendered:
    """``helm template`` of ``chart`` with values files and ``--set`` items, parsed."""
    if not chart:
        raise BadInputError(
            "no chart to render: give --chart DIR|oci://..., or --from-manifest FILE "
            "(the output of `helm template`)"
        )
    binary = shutil.which(helm)
    if binary is None:
        raise BadInputError(
            f"{helm}: Helm not found; install it, or pass --from-manifest FILE "
            "(the output of `helm template`)"
        )
    args = [binary, "template", release, chart]
    if namespace:
        args += ["--namespace", namespace]
    args += [a for f in values for a in ("--values", f)] + [a for s in sets for a in ("--set", s)]
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=HELM_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise BadInputError(f"helm template {chart}: no answer in {HELM_TIMEOUT_SECONDS} s") from e
    if proc.returncode != 0:
        raise BadInputError(f"helm template {chart}: {helm_error(proc.stderr)}")
    return parse(proc.stdout, f"helm template {chart}")


def helm_error(stderr: str) -> str:
    """Helm's error as one line (a schema error spans several)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln.removeprefix("Error: ") for ln in lines if not ln.startswith("WARNING")]
    return " ".join(lines) or "failed"


def s3_endpoint_and_region(rendered: Rendered) -> tuple[str, str]:
    """The S3 endpoint and region the pods use: config keys first, then the launcher's env."""
    training = rendered.training
    env = {
        e.get("name"): e.get("value")
        for e in _launcher(rendered.runtime or rendered.job).get("env") or []
        if isinstance(e, dict) and isinstance(e.get("value"), str)
    }
    endpoint = str(training.get("s3_endpoint_url") or env.get("AWS_ENDPOINT_URL") or "")
    region = str(training.get("s3_region") or env.get("AWS_REGION") or "")
    return endpoint, region


def _launcher(job: Mapping[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = _launcher_pod(job)["containers"][0]
    return container


# ---- one run of it --------------------------------------------------------------------------
def is_dns_label(name: str) -> bool:
    return len(name) <= c.MAX_NAME and bool(_DNS1123.match(name))


def label_value(text: str) -> str:
    """``text`` made a valid label value (63 characters of [A-Za-z0-9-_.], alnum ends)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def config_yaml(training: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(training), sort_keys=True, default_flow_style=False)


def check_training(training: Mapping[str, Any]) -> None:
    """The run's config must make a valid ``job.config.Config`` (its rules, not a copy)."""
    try:
        sources.from_mapping(training, "values training")
    except config_mod.ConfigError as e:
        raise BadInputError(str(e)) from e


@dataclass(frozen=True)
class Run:
    name: str
    output: str
    job: dict[str, Any]  # the MPIJob or TrainJob to create
    config_map: dict[str, Any] | None  # its own ConfigMap (MPIJob runs)


def build_run(
    rendered: Rendered,
    *,
    schedule: str = "",
    prefix: str = "",
    namespace: str | None = None,
    pretrained: str | None = None,
    resume_from: str | None = None,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> Run:
    """A uniquely named run of the rendered MPIJob, and its ConfigMap.

    ``training.output`` is the output root; the run writes to ``<root>/runs/<name>``.
    ``pretrained`` (already resolved, e.g. from ``<root>/latest``) replaces
    ``training.pretrained`` when given, and ``resume_from`` (a failed predecessor's output)
    sets ``training.resume_from``. Everything else stays as Helm rendered it.
    """
    training = rendered.training
    root = str(training.get("output") or "")
    if not root:
        raise BadInputError("values training.output (the output root) is required")
    name = registry.run_name(prefix or rendered.job["metadata"]["name"], now, rng)
    output = registry.run_output(root, name)
    training = {**training, "output": output}
    if pretrained is not None:
        training["pretrained"] = pretrained
    if resume_from is not None:
        training["resume_from"] = resume_from
    check_training(training)
    labels = {
        c.MANAGED_BY_LABEL: c.MANAGED_BY,
        c.RUN_LABEL: name,
        c.SCHEDULE_LABEL: label_value(schedule) or c.MANUAL_SCHEDULE,
    }
    if rendered.runtime is not None:
        flags = {"output": output, "pretrained": pretrained, "resume_from": resume_from}
        args = list(_launcher(rendered.runtime).get("args") or [])
        for key, value in flags.items():
            if value is not None:
                args += [config_mod.flag(key), str(value)]
        job = patch_trainjob(rendered.job, name=name, labels=labels, output=output, args=args)
        job["metadata"] = _metadata(job["metadata"], name, labels, namespace)
        return Run(name=name, output=output, job=job, config_map=None)
    text = config_yaml(training)
    config_map = _name(name + CONFIG_MAP_SUFFIX)
    job = patch_mpijob(
        rendered.job,
        name=name,
        labels=labels,
        output=output,
        old_config_map=rendered.config_map["metadata"]["name"],
        config_map=config_map,
        checksum=hashlib.sha256(text.rstrip("\n").encode()).hexdigest(),
        namespace=namespace,
    )
    cm = copy.deepcopy(rendered.config_map)
    cm["metadata"] = _metadata(cm["metadata"], config_map, labels, namespace)
    cm["data"] = {**(cm.get("data") or {}), c.CONFIG_KEY: text}
    return Run(name=name, output=output, job=job, config_map=cm)


def patch_trainjob(
    trainjob: Mapping[str, Any],
    *,
    name: str,
    labels: Mapping[str, str],
    output: str,
    args: list[str],
) -> dict[str, Any]:
    """The rendered TrainJob with the run's name, labels, output annotation and launcher
    arguments (``spec.trainer.args``)."""
    job = copy.deepcopy(dict(trainjob))
    job["metadata"] = _metadata(job["metadata"], name, labels, None)
    job["metadata"]["annotations"] = {
        **(job["metadata"].get("annotations") or {}),
        c.OUTPUT_ANNOTATION: output,
    }
    job["spec"].setdefault("trainer", {})["args"] = args
    return job


def patch_mpijob(
    mpijob: Mapping[str, Any],
    *,
    name: str,
    labels: Mapping[str, str],
    output: str,
    old_config_map: str,
    config_map: str,
    checksum: str,
    namespace: str | None,
) -> dict[str, Any]:
    """The rendered MPIJob with the run's name, labels, output annotation and ConfigMap."""
    job = copy.deepcopy(dict(mpijob))
    job["metadata"] = _metadata(job["metadata"], name, labels, namespace)
    job["metadata"]["annotations"] = {
        **(job["metadata"].get("annotations") or {}),
        c.OUTPUT_ANNOTATION: output,
    }
    for replica in job["spec"]["mpiReplicaSpecs"].values():
        template = replica["template"]
        meta = template.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if "checksum/config" in (meta.get("annotations") or {}):
            meta["annotations"]["checksum/config"] = checksum  # the pods' config is the run's
        for volume in template["spec"].get("volumes") or []:
            if (volume.get("configMap") or {}).get("name") == old_config_map:
                volume["configMap"]["name"] = config_map
    return job


def _metadata(
    meta: Mapping[str, Any], name: str, labels: Mapping[str, str], namespace: str | None
) -> dict[str, Any]:
    out = {k: copy.deepcopy(v) for k, v in meta.items() if k not in ("name", "namespace")}
    out = {"name": name, **({"namespace": namespace} if namespace else {}), **out}
    out["labels"] = {**(meta.get("labels") or {}), **labels}
    return out


def _name(name: str) -> str:
    return name[: c.MAX_NAME].removesuffix("-")
