"""The two kinds of run the chart renders, and what the client needs to know of each.

- ``MPIJob`` (``kubeflow.org/v2beta1``): the MPI Operator's custom resource. Its conditions are
  Created, Running, Restarting, Succeeded, Failed, Suspended; its pods carry
  ``training.kubeflow.org/job-name`` and ``job-role`` (launcher/worker); the launcher runs in
  the batch Job ``<name>-launcher``.
- ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``): Kubeflow Trainer v2. Its conditions are
  Created, Suspended, Complete, Failed (Trainer's ``TrainJobComplete``/``TrainJobFailed``); it
  runs as a JobSet of the same name, whose pods carry ``jobset.sigs.k8s.io/jobset-name`` and
  ``jobset.sigs.k8s.io/replicatedjob-name`` (the chart's replicated jobs are ``launcher`` and
  ``node``); the launcher runs in the batch Job ``<name>-launcher-0``.

Every other module takes these from here; tests/deploy/test_kinds.py checks the API groups,
versions and plurals against the CRDs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy import constants as c


@dataclass(frozen=True)
class Kind:
    name: str  # the object's kind
    group: str
    version: str
    plural: str
    phases: Mapping[str, str]  # condition type -> the phase it means (constants.SUCCEEDED, ...)
    run_label: str  # pod label whose value is the run's name
    role_label: str  # pod label whose value is the pod's role
    launcher_role: str
    worker_role: str
    launcher_job_suffix: str  # the batch Job that runs the launcher pod: <name><suffix>
    controller_failed_event: str  # the controller's Warning when it cannot create pods ("": none)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def resource(self) -> str:
        """``plural.group``, as error messages name the resource."""
        return f"{self.plural}.{self.group}"

    def run_pods(self, name: str) -> str:
        """Label selector of every pod of run ``name``."""
        return f"{self.run_label}={name}"

    def launcher_pods(self, name: str) -> str:
        return f"{self.run_pods(name)},{self.role_label}={self.launcher_role}"


MPIJOB = Kind(
    name=c.KIND,
    group=c.GROUP,
    version=c.VERSION,
    plural=c.PLURAL,
    phases={t: t for t in c.CONDITION_TYPES},
    run_label=c.OPERATOR_JOB_NAME_LABEL,
    role_label=c.OPERATOR_JOB_ROLE_LABEL,
    launcher_role=c.LAUNCHER_ROLE,
    worker_role=c.WORKER_ROLE,
    launcher_job_suffix=c.LAUNCHER_JOB_SUFFIX,
    controller_failed_event=c.OPERATOR_FAILED,
)
TRAINJOB = Kind(
    name="TrainJob",
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    phases={
        "Created": c.CREATED,
        "Suspended": c.SUSPENDED,
        "Complete": c.SUCCEEDED,
        "Failed": c.FAILED,
    },
    run_label="jobset.sigs.k8s.io/jobset-name",
    role_label="jobset.sigs.k8s.io/replicatedjob-name",
    launcher_role="launcher",
    worker_role="node",
    launcher_job_suffix="-launcher-0",
    controller_failed_event="",
)
KINDS = (MPIJOB, TRAINJOB)
# The TrainingRuntime a TrainJob of the chart references (its launcher args are read from it).
RUNTIME_KIND = "TrainingRuntime"


def of(obj: Mapping[str, Any]) -> Kind:
    """The Kind of an object as the API or Helm gives it (MPIJob when it names none)."""
    name = obj.get("kind")
    for kind in KINDS:
        if kind.name == name:
            return kind
    return MPIJOB


def named(name: str) -> Kind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"unknown kind {name!r}; one of {', '.join(k.name for k in KINDS)}")
