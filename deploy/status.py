"""What an MPIJob's ``status.conditions`` mean: one phase, its reason and message.

Pure functions over the MPIJob dict, so the rules are tested without a cluster. The MPI
Operator keeps one condition per type (Created, Running, Restarting, Succeeded, Failed,
Suspended) with status "True"/"False"; a job is finished once Succeeded or Failed is True.

It sets none for a run whose pods cannot start: ``deploy.stuck`` reads those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploy import constants as c
from deploy import kinds

# First True condition in this order decides the phase: terminal ones win over transient.
_PRECEDENCE = (c.FAILED, c.SUCCEEDED, c.SUSPENDED, c.RESTARTING, c.RUNNING, c.CREATED)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""

    @property
    def is_true(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class JobState:
    namespace: str
    name: str
    phase: str
    reason: str = ""
    message: str = ""
    conditions: tuple[Condition, ...] = ()
    output: str = ""
    kind: str = c.KIND  # MPIJob or TrainJob (deploy.kinds)
    run: str = ""
    schedule: str = ""
    created: str = ""
    completed: str = ""
    resource_version: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in c.TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.phase == c.SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.phase == c.FAILED

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def describe(self) -> str:
        """One line: ``ns/name Phase (Reason: message)``."""
        why = ": ".join(p for p in (self.reason, self.message) if p)
        return f"{self.ref} {self.phase}" + (f" ({why})" if why else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "kind": self.kind,
            "phase": self.phase,
            "reason": self.reason,
            "message": self.message,
            "output": self.output,
            "run": self.run,
            "schedule": self.schedule,
            "created": self.created,
            "completed": self.completed,
            "conditions": [vars(cond) for cond in self.conditions],
        }


def conditions(obj: dict[str, Any]) -> tuple[Condition, ...]:
    """The object's conditions, their types as phases (a TrainJob's Complete is Succeeded)."""
    raw = ((obj.get("status") or {}).get("conditions")) or []
    phases = kinds.of(obj).phases
    return tuple(
        Condition(
            type=phases.get(str(d.get("type", "")), str(d.get("type", ""))),
            status=str(d.get("status", "")),
            reason=str(d.get("reason") or ""),
            message=str(d.get("message") or ""),
            last_transition_time=str(d.get("lastTransitionTime") or ""),
        )
        for d in raw
        if isinstance(d, dict)
    )


def phase_of(conds: tuple[Condition, ...]) -> Condition | None:
    """The condition that decides the phase, or None while the job has none True."""
    true = {cond.type: cond for cond in conds if cond.is_true}
    for kind in _PRECEDENCE:
        if kind in true:
            return true[kind]
    return None


def job_state(obj: dict[str, Any]) -> JobState:
    """Interpret an MPIJob or TrainJob object (as the API returns it)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = obj.get("status") or {}
    conds = conditions(obj)
    deciding = phase_of(conds)
    return JobState(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        phase=deciding.type if deciding else c.PENDING,
        reason=_trimmed(deciding.reason, "/") if deciding else "",
        message=_trimmed(deciding.message, ": ") if deciding else "",
        conditions=conds,
        output=str((meta.get("annotations") or {}).get(c.OUTPUT_ANNOTATION, "")),
        kind=kinds.of(obj).name,
        run=str(labels.get(c.RUN_LABEL, "")),
        schedule=str(labels.get(c.SCHEDULE_LABEL, "")),
        created=str(meta.get("creationTimestamp") or ""),
        completed=str(status.get("completionTime") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def _trimmed(text: str, joiner: str) -> str:
    """The text without an empty part the operator joined on: a failed MPIJob's reason is
    ``BackoffLimitExceeded/<last pod's reason>`` and its message ``<Job's>: <pod's>``, and a
    pod whose container exited non-zero has neither."""
    return text.removesuffix(joiner).strip()
