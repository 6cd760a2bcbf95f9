"""Chart values -> MPIJob (and its training-config ConfigMap), as pure functions.

``build_mpijob`` builds exactly what ``charts/finetune-job/templates/mpijob.yaml`` renders from
the same values (``tests/deploy/test_manifest_matches_chart.py`` renders the chart with the
real ``helm`` and compares), so a pipeline can submit a run without Helm. ``build_run`` adds
what a scheduled run needs on top:

- a unique name, ``<prefix>-<UTC yyyymmdd-hhmmss>-<4 random>`` (``run_name``);
- labels ``finetune-job/run`` and ``finetune-job/schedule`` on the MPIJob and its pods;
- its own output, ``<training.output>/runs/<name>`` (annotation ``finetune-job/output``);
- its own ConfigMap ``<name>-training`` with ``config.yaml`` (the run's ``training`` keys,
  output replaced). ``MPIJobClient.submit`` creates it owned by the MPIJob, so it is
  garbage-collected with it, and a run keeps the config it started with even when the
  release's values change later.

Values are the chart's ``values.yaml`` keys (``DEFAULTS`` mirrors the ones used here), or
what the chart's CronJob mounts for ``finetune-job submit`` (the same keys plus ``release``:
name, fullname, serviceAccountName and labels resolved by Helm).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import random
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from deploy import constants as c
from deploy.errors import BadInputError
from deploy.retrain import run_output

CHART = "finetune-job"
CONFIG_MAP_SUFFIX = "-training"
# The chart's values.yaml defaults of every key used here (a test keeps them equal).
DEFAULTS: dict[str, Any] = {
    "nameOverride": "",
    "fullnameOverride": "",
    "image": {
        "repository": "finetune-job",
        "tag": "",
        "pullPolicy": "IfNotPresent",
        "pullSecrets": [],
    },
    "slotsPerWorker": 1,
    "launcherCreationPolicy": "WaitForWorkersReady",
    "sshAuthMountPath": "/home/mpiuser/.ssh",
    "runPolicy": {
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 604800,
        "backoffLimit": 3,
        "activeDeadlineSeconds": None,
    },
    "mpirun": {"extraArgs": []},
    "launcher": {
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        },
        "restartPolicy": "OnFailure",
        "nodeSelector": {},
        "tolerations": [],
    },
    "workers": {
        "replicas": 2,
        "resources": {},
        "ompNumThreads": 0,
        "shmSize": "1Gi",
        "command": ["/usr/bin/tini", "--", "/usr/local/bin/finetune-job-entrypoint", "worker"],
        "readinessProbe": {
            "tcpSocket": {"port": 2222},
            "initialDelaySeconds": 2,
            "periodSeconds": 5,
        },
        "restartPolicy": "Never",
        "nodeSelector": {},
        "tolerations": [],
        "affinity": {},
        "priorityClassName": "",
    },
    "terminationGracePeriodSeconds": 120,
    "training": {
        "data": "",
        "output": "",
        "model": "resnet18_v2",
        "epochs": 10,
        "batch_size": 32,
        "lr": 0.01,
        "metrics_port": 9095,
    },
    "s3": {"endpoint": "", "region": "", "existingSecret": "", "webIdentity": False},
    "serviceAccount": {"create": True, "name": "", "annotations": {}},
    "env": [],
    "extraVolumes": [],
    "extraVolumeMounts": [],
    "cudaCache": {
        "enabled": False,
        "path": "/home/mpiuser/.nv/ComputeCache",
        "maxSize": 4294967296,
        "volume": {},
    },
    "podAnnotations": {},
    "podLabels": {},
    "podSecurityContext": {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
}
# Chart keys that do not shape the MPIJob; accepted in values files and ignored here.
IGNORED_KEYS = {
    "global",
    "runOnInstall",
    "metrics",
    "networkPolicy",
    "schedule",
    "cronJob",
    "release",
}
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# ---- values --------------------------------------------------------------------------------
def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's coalescing: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(item: str) -> dict[str, Any]:
    """``a.b.c=v`` -> ``{"a": {"b": {"c": v}}}``; ``v`` is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise BadInputError(f"--set {item!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise BadInputError(f"--set {item!r}: value is not a YAML scalar") from e
    for part in reversed(key.split(".")):
        value = {part: value}
    return value  # type: ignore[return-value]


def load_values(
    files: list[str] | tuple[str, ...] = (),
    sets: list[str] | tuple[str, ...] = (),
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``DEFAULTS``, then each ``--values`` file, then each ``--set`` (later wins)."""
    values = copy.deepcopy(dict(DEFAULTS if base is None else base))
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
        except OSError as e:
            raise BadInputError(f"values file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise BadInputError(
                f"values file {path} is not valid YAML: {str(e).splitlines()[0]}"
            ) from e
        if not isinstance(doc, dict):
            raise BadInputError(f"values file {path} must hold a mapping")
        values = merge(values, doc)
    for item in sets:
        values = merge(values, parse_set(item))
    check_keys(values)
    return values


def check_keys(values: Mapping[str, Any]) -> None:
    """Unknown keys fail, as the chart's strict values.schema.json makes them fail."""
    for key, value in values.items():
        if key in IGNORED_KEYS:
            continue
        if key not in DEFAULTS:
            raise BadInputError(f"unknown values key '{key}'")
        default = DEFAULTS[key]
        free_form = key in (
            "training",
            "podAnnotations",
            "podLabels",
            "podSecurityContext",
            "securityContext",
        )
        if isinstance(default, dict) and not free_form:
            if not isinstance(value, Mapping):
                raise BadInputError(f"values key '{key}' must be a mapping, got {value!r}")
            for sub in value:
                if sub not in default:
                    raise BadInputError(f"unknown values key '{key}.{sub}'")


# ---- names, as _helpers.tpl resolves them ---------------------------------------------------
def _trunc(name: str, n: int = c.MAX_NAME) -> str:
    return name[:n].removesuffix("-")


def chart_name(values: Mapping[str, Any]) -> str:
    return _trunc(values.get("nameOverride") or CHART)


def fullname(values: Mapping[str, Any], release: str) -> str:
    if values.get("fullnameOverride"):
        return _trunc(values["fullnameOverride"])
    name = values.get("nameOverride") or CHART
    return _trunc(release if name in release else f"{release}-{name}")


@dataclass(frozen=True)
class Release:
    """What Helm resolves for a release; the CronJob passes it as ``values["release"]``."""

    name: str
    fullname: str
    service_account: str
    labels: dict[str, str]

    @classmethod
    def of(
        cls,
        values: Mapping[str, Any],
        name: str = CHART,
        chart_version: str = "0.1.0",
        app_version: str = "0.1.0",
        service: str = "Helm",
    ) -> Release:
        """Resolve from values (``values["release"]`` wins, as mounted by the CronJob)."""
        given = values.get("release") or {}
        if given:
            try:
                return cls(
                    name=str(given["name"]),
                    fullname=str(given["fullname"]),
                    service_account=str(given["serviceAccountName"]),
                    labels={str(k): str(v) for k, v in given["labels"].items()},
                )
            except (KeyError, AttributeError) as e:
                raise BadInputError(f"values key 'release' lacks {e}") from e
        full = fullname(values, name)
        sa = values["serviceAccount"]
        account = (sa.get("name") or full) if sa.get("create") else (sa.get("name") or "default")
        tag = values["image"].get("tag") or app_version
        labels = {
            "helm.sh/chart": _trunc(f"{CHART}-{chart_version}".replace("+", "_")),
            c.NAME_LABEL: chart_name(values),
            c.INSTANCE_LABEL: name,
            "app.kubernetes.io/version": str(tag),
            c.MANAGED_BY_LABEL: service,
            "app.kubernetes.io/part-of": CHART,
        }
        return cls(name=name, fullname=full, service_account=account, labels=labels)


def is_dns_label(name: str) -> bool:
    return len(name) <= c.MAX_NAME and bool(_DNS1123.match(name))


def run_name(prefix: str, now: dt.datetime | None = None, rng: random.Random | None = None) -> str:
    """``<prefix>-<yyyymmdd-hhmmss UTC>-<4 of [a-z0-9]>``, at most ``MAX_RUN_NAME`` long.

    The prefix is lowercased, other characters become ``-``, it is cut to fit, and it gets
    an ``r`` in front when it would not start with a letter (Service names need one).
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    alphabet = string.ascii_lowercase + string.digits
    pick = rng.choice if rng is not None else secrets.choice
    suffix = f"-{now:%Y%m%d-%H%M%S}-" + "".join(pick(alphabet) for _ in range(4))
    clean = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = ("r-" + clean).rstrip("-")
    clean = clean[: c.MAX_RUN_NAME - len(suffix)].rstrip("-")
    return clean + suffix


def label_value(text: str) -> str:
    """``text`` made a valid label value (63 characters of [A-Za-z0-9-_.], alnum ends)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


# ---- pieces of the pod templates (one function per _helpers.tpl / _pod.tpl define) ---------
def config_yaml(training: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(training), sort_keys=True, default_flow_style=False)


def omp_num_threads(values: Mapping[str, Any]) -> int:
    workers = values["workers"]
    n = int(workers.get("ompNumThreads") or 0)
    if n == 0:
        res = workers.get("resources") or {}
        cpu = (res.get("limits") or {}).get("cpu", (res.get("requests") or {}).get("cpu", ""))
        if re.fullmatch(r"[0-9]+(\.0+)?", str(cpu)):
            n = int(float(cpu)) // int(values["slotsPerWorker"])
    return max(n, 1)


def env(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    s3, cuda = values["s3"], values["cudaCache"]
    out: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": str(omp_num_threads(values))}]
    if s3.get("endpoint"):
        out.append({"name": "AWS_ENDPOINT_URL", "value": str(s3["endpoint"])})
    if s3.get("region"):
        out.append({"name": "AWS_REGION", "value": str(s3["region"])})
    if s3.get("existingSecret"):
        out += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": s3["existingSecret"], "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    if cuda.get("enabled"):
        out += [
            {"name": "CUDA_CACHE_PATH", "value": str(cuda["path"])},
            {"name": "CUDA_CACHE_MAXSIZE", "value": str(int(cuda["maxSize"]))},
        ]
    return out + copy.deepcopy(list(values.get("env") or []))


def forwarded_env(values: Mapping[str, Any]) -> list[str]:
    names = ["LD_LIBRARY_PATH", "PATH", "OMP_NUM_THREADS"]
    for item in env(values):
        if item["name"] not in names:
            names.append(item["name"])
    if values["s3"].get("webIdentity"):
        names += ["AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"]
    return names


def launcher_command(values: Mapping[str, Any]) -> list[str]:
    """The MPI Operator's Open MPI launcher line around ``finetune-job train --config``."""
    np = int(values["workers"]["replicas"]) * int(values["slotsPerWorker"])
    cmd = ["mpirun", "-np", str(np), "-bind-to", "none", "-map-by", "slot"]
    for name in forwarded_env(values):
        cmd += ["-x", name]
    cmd += ["-mca", "pml", "ob1", "-mca", "btl", "^openib"]
    cmd += [str(a) for a in values["mpirun"].get("extraArgs") or []]
    return cmd + ["finetune-job", "train", "--config", c.CONFIG_PATH]


def volumes(values: Mapping[str, Any], config_map: str, worker: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": config_map}}]
    shm, cuda = values["workers"].get("shmSize"), values["cudaCache"]
    if worker and shm:
        out.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    if worker and cuda.get("enabled"):
        if not cuda.get("volume"):
            raise BadInputError(
                "cudaCache.enabled needs cudaCache.volume, a volume source "
                "such as persistentVolumeClaim"
            )
        out.append({"name": "cuda-cache", **copy.deepcopy(cuda["volume"])})
    return out + copy.deepcopy(list(values.get("extraVolumes") or []))


def volume_mounts(values: Mapping[str, Any], worker: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True}]
    if worker and values["workers"].get("shmSize"):
        out.append({"name": "dshm", "mountPath": "/dev/shm"})
    if worker and values["cudaCache"].get("enabled"):
        out.append({"name": "cuda-cache", "mountPath": values["cudaCache"]["path"]})
    return out + copy.deepcopy(list(values.get("extraVolumeMounts") or []))


def metrics_ports(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    base = int(values["training"].get("metrics_port") or 0)
    if base <= 0:
        return []
    return [
        {
            "name": "metrics" if r == 0 else f"metrics-{r}",
            "containerPort": base + r,
            "protocol": "TCP",
        }
        for r in range(int(values["slotsPerWorker"]))
    ]


def run_policy(values: Mapping[str, Any]) -> dict[str, Any]:
    rp = values["runPolicy"]
    out = {"cleanPodPolicy": rp["cleanPodPolicy"], "backoffLimit": rp["backoffLimit"]}
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if rp.get(key) is not None:
            out[key] = int(rp[key])
    return out


def pod_template(
    values: Mapping[str, Any],
    release: Release,
    config_map: str,
    checksum: str,
    worker: bool,
    extra_labels: Mapping[str, str],
) -> dict[str, Any]:
    v = values
    role = c.WORKER_ROLE if worker else c.LAUNCHER_ROLE
    side = v["workers"] if worker else v["launcher"]
    labels = {
        **release.labels,
        c.COMPONENT_LABEL: role,
        **(v.get("podLabels") or {}),
        **extra_labels,
    }
    spec: dict[str, Any] = {
        "serviceAccountName": release.service_account,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": int(v["terminationGracePeriodSeconds"]),
    }
    if v["image"].get("pullSecrets"):
        spec["imagePullSecrets"] = copy.deepcopy(v["image"]["pullSecrets"])
    if v.get("podSecurityContext"):
        spec["securityContext"] = copy.deepcopy(v["podSecurityContext"])
    keys = (
        ("priorityClassName", "nodeSelector", "tolerations", "affinity")
        if worker
        else ("nodeSelector", "tolerations")
    )
    spec.update({k: copy.deepcopy(side[k]) for k in keys if side.get(k)})
    tag = v["image"].get("tag") or release.labels.get("app.kubernetes.io/version", "")
    container: dict[str, Any] = {
        "name": role,
        "image": f"{v['image']['repository']}:{tag}",
        "imagePullPolicy": v["image"]["pullPolicy"],
        "command": [str(a) for a in v["workers"]["command"]] if worker else launcher_command(v),
        "env": env(v),
    }
    if worker and metrics_ports(v):
        container["ports"] = metrics_ports(v)
    if worker and v["workers"].get("readinessProbe"):
        container["readinessProbe"] = copy.deepcopy(v["workers"]["readinessProbe"])
    if side.get("resources"):
        container["resources"] = copy.deepcopy(side["resources"])
    if v.get("securityContext"):
        container["securityContext"] = copy.deepcopy(v["securityContext"])
    container["volumeMounts"] = volume_mounts(v, worker)
    spec["containers"] = [container]
    spec["volumes"] = volumes(v, config_map, worker)
    return {
        "metadata": {
            "labels": labels,
            "annotations": {"checksum/config": checksum, **(v.get("podAnnotations") or {})},
        },
        "spec": spec,
    }


def check_gpus(values: Mapping[str, Any]) -> None:
    gpus = ((values["workers"].get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
    if gpus not in (None, "") and str(gpus) != str(values["slotsPerWorker"]):
        raise BadInputError(
            f"slotsPerWorker ({values['slotsPerWorker']}) must equal "
            f"workers.resources.limits.nvidia.com/gpu ({gpus}): one process "
            f"per GPU"
        )


# ---- the objects ---------------------------------------------------------------------------
def build_mpijob(
    values: Mapping[str, Any],
    release: Release,
    *,
    name: str | None = None,
    config_map: str | None = None,
    extra_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The MPIJob ``templates/mpijob.yaml`` renders (name and ConfigMap: the release's)."""
    check_gpus(values)
    name = name or release.fullname
    config_map = config_map or _trunc(release.fullname + CONFIG_MAP_SUFFIX)
    extra = dict(extra_labels or {})
    # Helm's toYaml drops the final newline; hash the same text the chart hashes.
    checksum = hashlib.sha256(config_yaml(values["training"]).rstrip("\n").encode()).hexdigest()
    metadata: dict[str, Any] = {"name": name, "labels": {**release.labels, **extra}}
    if namespace:
        metadata["namespace"] = namespace
    if annotations:
        metadata["annotations"] = dict(annotations)
    replica = {
        "Launcher": (1, values["launcher"]["restartPolicy"], False),
        "Worker": (values["workers"]["replicas"], values["workers"]["restartPolicy"], True),
    }
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": metadata,
        "spec": {
            "slotsPerWorker": values["slotsPerWorker"],
            "launcherCreationPolicy": values["launcherCreationPolicy"],
            "sshAuthMountPath": values["sshAuthMountPath"],
            "mpiImplementation": "OpenMPI",
            "runPolicy": run_policy(values),
            "mpiReplicaSpecs": {
                kind: {
                    "replicas": replicas,
                    "restartPolicy": restart,
                    "template": pod_template(values, release, config_map, checksum, worker, extra),
                }
                for kind, (replicas, restart, worker) in replica.items()
            },
        },
    }


def build_config_map(
    name: str, training: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {c.CONFIG_KEY: config_yaml(training)},
    }


def check_training(training: Mapping[str, Any]) -> None:
    """The training keys must make a valid ``job.config.Config`` (else: bad input, exit 3)."""
    from job import config as config_mod

    try:
        parsed = {k: config_mod.coerce(k, v, "values training") for k, v in training.items()}
        for key, value in parsed.items():
            choices = config_mod.FIELDS[key].metadata["choices"]
            if choices and value not in choices:
                raise config_mod.ConfigError(
                    f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}"
                )
        config_mod.Config(**parsed)
    except config_mod.ConfigError as e:
        raise BadInputError(f"values training: {e}") from e


@dataclass(frozen=True)
class Run:
    name: str
    output: str
    mpijob: dict[str, Any]
    config_map: dict[str, Any]


def build_run(
    values: Mapping[str, Any],
    release: Release,
    *,
    schedule: str = "",
    prefix: str = "",
    namespace: str | None = None,
    pretrained: str | None = None,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> Run:
    """A uniquely named run of ``values``: its MPIJob and its ConfigMap.

    ``training.output`` is the output root; the run writes to ``<root>/runs/<name>``.
    ``pretrained`` (already resolved, e.g. from ``<root>/latest``) replaces
    ``training.pretrained`` when given.
    """
    root = str(values["training"].get("output") or "")
    if not root:
        raise BadInputError("values training.output (the output root) is required")
    name = run_name(prefix or release.fullname, now, rng)
    output = run_output(root, name)
    training = {**values["training"], "output": output}
    if pretrained is not None:
        training["pretrained"] = pretrained
    check_training(training)
    extra = {c.RUN_LABEL: name, c.SCHEDULE_LABEL: label_value(schedule) or c.MANUAL_SCHEDULE}
    run_values = {**values, "training": training}
    labels = {**release.labels, c.MANAGED_BY_LABEL: c.MANAGED_BY}
    run_release = Release(release.name, release.fullname, release.service_account, labels)
    config_map = _trunc(name + CONFIG_MAP_SUFFIX)
    mpijob = build_mpijob(
        run_values,
        run_release,
        name=name,
        config_map=config_map,
        extra_labels=extra,
        annotations={c.OUTPUT_ANNOTATION: output},
        namespace=namespace,
    )
    cm = build_config_map(config_map, training, {**labels, **extra}, namespace)
    return Run(name=name, output=output, mpijob=mpijob, config_map=cm)
