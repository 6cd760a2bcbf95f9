"""A run that cannot start: its pods' problems, and when one has lasted too long.

The MPI Operator sets a condition only once the launcher Job fails or every pod runs. A pod
whose image cannot be pulled, whose Secret is missing, or that no node fits, leaves the run
without any condition for ever. ``pod_problems`` reads such states from a pod's container
waiting reasons and its PodScheduled condition; ``StuckTracker`` adds the Warning events of
pods that could not be created and tells when such a state lasted longer than its bound.
Pure functions and one class over dicts, with time passed in: tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from deploy import constants as c
from deploy import kinds
from deploy.kinds import Kind

START = "start"
UNSCHEDULABLE = "unschedulable"


@dataclass(frozen=True)
class StuckBounds:
    """Seconds a run's pod may stay unable to start before waiting gives up (0: never)."""

    start: float = c.START_TIMEOUT
    unschedulable: float = c.UNSCHEDULABLE_TIMEOUT

    def of(self, kind: str) -> float:
        return self.unschedulable if kind == UNSCHEDULABLE else self.start


@dataclass(frozen=True)
class Problem:
    """One reason a run cannot start, e.g. a container in ImagePullBackOff."""

    key: tuple[str, ...]  # what is stuck: a reason that flips (ErrImagePull <-> ...) keeps time
    kind: str  # START or UNSCHEDULABLE: which bound applies
    subject: str  # "pod P container C", "pod P", "Job J"
    reason: str
    message: str
    pod: str = ""
    container: str = ""

    def describe(self, bound: float) -> str:
        line = f"{self.subject}: {self.reason} for over {round(bound, 1):g} s"
        return f"{line}: {self.message}" if self.message else line


def one_line(text: Any) -> str:
    """Server messages may hold newlines; an error is one line."""
    return " ".join(str(text or "").split())


def _waiting_problems(pod: str, statuses: list[Any]) -> list[Problem]:
    found = []
    for status in statuses:
        waiting = ((status or {}).get("state") or {}).get("waiting") or {}
        reason = str(waiting.get("reason") or "")
        group = "image" if reason in c.IMAGE_REASONS else "config"
        if reason in c.IMAGE_REASONS or reason in c.CONFIG_REASONS:
            container = str(status.get("name") or "")
            found.append(
                Problem(
                    key=(pod, container, group),
                    kind=START,
                    subject=f"pod {pod} container {container}",
                    reason=reason,
                    message=one_line(waiting.get("message")),
                    pod=pod,
                    container=container,
                )
            )
    return found


def pod_problems(pod: dict[str, Any]) -> list[Problem]:
    """Why this pod cannot start (empty when nothing is known to stop it)."""
    name = str((pod.get("metadata") or {}).get("name") or "")
    status = pod.get("status") or {}
    found = []
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == c.POD_SCHEDULED
            and cond.get("status") == "False"
            and cond.get("reason") == c.UNSCHEDULABLE
        ):
            found.append(
                Problem(
                    key=(name, "", UNSCHEDULABLE),
                    kind=UNSCHEDULABLE,
                    subject=f"pod {name}",
                    reason=c.UNSCHEDULABLE,
                    message=one_line(cond.get("message")),
                    pod=name,
                )
            )
    statuses = list(status.get("initContainerStatuses") or [])
    statuses += list(status.get("containerStatuses") or [])
    return found + _waiting_problems(name, statuses)


def pod_started(pod: dict[str, Any]) -> bool:
    """A container of the pod runs or ran: its volumes were mounted."""
    status = pod.get("status") or {}
    statuses = list(status.get("initContainerStatuses") or [])
    statuses += list(status.get("containerStatuses") or [])
    return any(
        k in ((s or {}).get("state") or {}) for s in statuses for k in ("running", "terminated")
    )


def event_time(event: dict[str, Any]) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


class StuckTracker:
    """What keeps one run from starting, and since when; time is passed in (monotonic).

    Feed it the run's pods and the namespace's Warning events as the watches deliver them;
    ``overdue(now)`` names the first problem that has lasted longer than its bound.
    """

    def __init__(self, name: str, bounds: StuckBounds, kind: Kind = kinds.MPIJOB) -> None:
        self.name = name
        self.bounds = bounds
        self.kind = kind
        self.pods: dict[str, dict[str, Any]] = {}
        self.problems: dict[tuple[str, ...], tuple[float, Problem, str]] = {}
        self.pull_errors: dict[tuple[str, ...], str] = {}

    # -- pods --
    def pod(self, event_type: str, pod: dict[str, Any], now: float) -> None:
        name = str(pod["metadata"]["name"])
        if event_type == "DELETED":
            self.pods.pop(name, None)
            self._drop(lambda key, _: key[0] == name)
            return
        self.pods[name] = pod
        found = {p.key: p for p in pod_problems(pod)}
        started = pod_started(pod)
        # This pod's own problems are replaced; a mount problem ends once a container starts.
        self._drop(
            lambda key, origin: (
                key[0] == name
                and key not in found
                and (origin == "pod" or (key[2] == c.FAILED_MOUNT and started))
            )
        )
        for problem in found.values():
            self._note(problem, now, "pod")
        self._clear_created(pod)

    def relist_pods(self, pods: list[dict[str, Any]], now: float) -> None:
        """A fresh list replaces what was known: pods missing from it are gone."""
        names = {str(p["metadata"]["name"]) for p in pods}
        for gone in set(self.pods) - names:
            self.pod("DELETED", self.pods[gone], now)
        for pod in pods:
            self.pod("MODIFIED", pod, now)

    def _clear_created(self, pod: dict[str, Any]) -> None:
        """A pod of a role exists since an event said it could not be created: fixed."""
        meta = pod.get("metadata") or {}
        role = str((meta.get("labels") or {}).get(self.kind.role_label) or "")
        created = str(meta.get("creationTimestamp") or "")
        self._drop(
            lambda key, origin: (
                key == ("create", role, "")
                and origin.startswith("event:")
                and created >= origin.removeprefix("event:")
            )
        )

    # -- events --
    def event(self, event: dict[str, Any], now: float) -> None:
        problem = self.event_problem(event)
        if problem is None:
            return
        when = event_time(event)
        if problem.key[0] == "create" and any(
            str((p["metadata"].get("labels") or {}).get(self.kind.role_label) or "")
            == problem.key[1]
            and str(p["metadata"].get("creationTimestamp") or "") >= when
            for p in self.pods.values()
        ):
            return  # a pod was created after this event: the failure is over
        if problem.pod in self.pods and pod_started(self.pods[problem.pod]):
            return  # an old mount failure of a pod that runs now
        self._note(problem, now, "event:" + when)

    def event_problem(self, event: dict[str, Any]) -> Problem | None:
        """A Warning event that says a pod of this run cannot be created or mounted."""
        if event.get("type") != c.WARNING:
            return None
        obj = event.get("involvedObject") or {}
        kind, name, reason = obj.get("kind"), str(obj.get("name") or ""), event.get("reason")
        message = one_line(event.get("message"))
        run = self.kind
        launcher_job = self.name + run.launcher_job_suffix
        if kind == c.JOB_KIND and name == launcher_job and reason == c.FAILED_CREATE:
            return Problem(
                ("create", run.launcher_role, ""), START, f"{c.JOB_KIND} {name}", reason, message
            )
        failed = run.controller_failed_event
        if kind == run.name and name == self.name and failed and reason == failed:
            return Problem(
                ("create", run.worker_role, ""), START, f"{run.name} {name}", reason, message
            )
        if kind == c.POD_KIND and reason == c.FAILED_MOUNT and self._ours(name):
            subject = f"pod {name}"
            return Problem((name, "", c.FAILED_MOUNT), START, subject, reason, message, pod=name)
        return None

    def _ours(self, pod: str) -> bool:
        return pod in self.pods or pod.startswith(self.name + "-")

    # -- decisions --
    def _note(self, problem: Problem, now: float, origin: str) -> None:
        # ImagePullBackOff only says "Back-off pulling image"; the ErrImagePull before it
        # said why (not found, unauthorized): keep that in the message.
        if problem.reason == "ErrImagePull" and problem.message:
            self.pull_errors[problem.key] = problem.message
        elif problem.reason == "ImagePullBackOff" and problem.key in self.pull_errors:
            why = self.pull_errors[problem.key]
            problem = replace(problem, message=f"{problem.message}; last pull error: {why}")
        since = self.problems.get(problem.key, (now, problem, origin))[0]
        self.problems[problem.key] = (since, problem, origin)

    def _drop(self, doomed: Callable[[tuple[str, ...], str], bool]) -> None:
        for key, (_, _, origin) in list(self.problems.items()):
            if doomed(key, origin):
                del self.problems[key]

    def _due(self) -> list[tuple[float, Problem]]:
        return sorted(
            (
                (since + self.bounds.of(p.kind), p)
                for since, p, _ in self.problems.values()
                if self.bounds.of(p.kind) > 0
            ),
            key=lambda due: due[0],
        )

    def next_due(self) -> float | None:
        """When the next problem becomes overdue (monotonic), None when none is pending."""
        due = self._due()
        return due[0][0] if due else None

    def overdue(self, now: float) -> Problem | None:
        due = self._due()
        return due[0][1] if due and due[0][0] <= now else None
