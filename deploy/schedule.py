"""Single-flight, resumable schedules: what ``submit --schedule NAME`` checks and sets.

- One run of a schedule at a time: while an MPIJob of the schedule has not finished, the
  next tick refuses to start (``--allow-overlap`` overrides).
- No run outlives its submit: the MPIJob's ``runPolicy.activeDeadlineSeconds`` is at most
  the submit's ``--timeout``, so a timed-out submit leaves nothing running ungated for long.
- Nothing trained is thrown away: when the schedule's newest run failed part-way (an evicted
  worker marks the whole MPIJob Failed), the next run resumes from that run's checkpoint
  (``training.resume_from``), under the job's fingerprint check.
"""

from __future__ import annotations

from typing import Any

from deploy import constants as c
from deploy import kinds
from deploy.errors import BadInputError
from job import layout
from job.storage import Storage


def selector(schedule: str) -> str:
    return f"{c.SCHEDULE_LABEL}={schedule}"


def refuse_overlap(client: Any, schedule: str) -> None:
    """BadInputError naming the unfinished runs of ``schedule`` (the label value), if any."""
    running = [s for s in client.list_jobs(selector(schedule)) if not s.finished]
    if running:
        names = ", ".join(s.ref for s in running)
        raise BadInputError(
            f"schedule {schedule}: {names} has not finished; not starting another run "
            "alongside it (--allow-overlap to do so)"
        )


def cap_deadline(job: dict[str, Any], timeout: float) -> int:
    """Set the run's active deadline (an MPIJob's ``runPolicy.activeDeadlineSeconds``, a
    TrainJob's ``spec.activeDeadlineSeconds``) to at most ``timeout``; returns it."""
    policy = (
        job["spec"] if kinds.of(job) is kinds.TRAINJOB else job["spec"].setdefault("runPolicy", {})
    )
    current = policy.get("activeDeadlineSeconds")
    deadline = max(1, int(timeout))
    if current is None or int(current) > deadline:
        policy["activeDeadlineSeconds"] = deadline
    return int(policy["activeDeadlineSeconds"])


def resumable_predecessor(client: Any, storage: Storage, schedule: str) -> tuple[str, str] | None:
    """(output, pretrained) of the schedule's newest run when it failed part-way: it left a
    checkpoint and no summary. ``pretrained`` is what that run started from (from its
    checkpoint's config), so the resumed run has the same fingerprint."""
    runs = client.list_jobs(selector(schedule))
    finished = [s for s in runs if s.finished]
    if not finished or not finished[-1].failed or not finished[-1].output:
        return None
    output = finished[-1].output
    config = layout.checkpointed_config(storage, output)
    if config is None or not isinstance(config.get("pretrained"), str):
        return None  # finished after all, or nothing usable to resume: start afresh
    return output, config["pretrained"]
