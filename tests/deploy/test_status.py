"""What MPIJob conditions mean."""

from __future__ import annotations

import pytest

from deploy import constants as c
from deploy.status import job_state


def job(*conds: tuple[str, str]) -> dict:
    return {
        "metadata": {
            "name": "r1",
            "namespace": "ml",
            "labels": {c.RUN_LABEL: "r1", c.SCHEDULE_LABEL: "nightly"},
            "annotations": {c.OUTPUT_ANNOTATION: "s3://b/out/runs/r1"},
        },
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": f"{t}Reason", "message": f"{t} message"}
                for t, s in conds
            ]
        },
    }


@pytest.mark.parametrize(
    ("conds", "phase", "finished"),
    [
        ((), c.PENDING, False),
        ((("Created", "True"),), c.CREATED, False),
        ((("Created", "True"), ("Running", "True")), c.RUNNING, False),
        ((("Created", "True"), ("Running", "False"), ("Restarting", "True")), c.RESTARTING, False),
        ((("Created", "True"), ("Running", "False"), ("Succeeded", "True")), c.SUCCEEDED, True),
        ((("Created", "True"), ("Running", "True"), ("Failed", "True")), c.FAILED, True),
        ((("Succeeded", "False"), ("Running", "True")), c.RUNNING, False),
        ((("Created", "True"), ("Suspended", "True")), c.SUSPENDED, False),
    ],
    ids=[
        "no-conditions",
        "created",
        "running",
        "restarting",
        "succeeded",
        "failed-wins-over-running",
        "false-is-ignored",
        "suspended",
    ],
)
def test_phase_from_conditions(conds, phase, finished):
    state = job_state(job(*conds))
    assert state.phase == phase
    assert state.finished is finished
    if conds and phase != c.PENDING:
        assert state.reason == f"{phase}Reason"


def test_state_carries_run_schedule_output_and_names_itself():
    state = job_state(job(("Failed", "True")))
    assert (state.run, state.schedule, state.output) == ("r1", "nightly", "s3://b/out/runs/r1")
    assert state.describe() == "ml/r1 Failed (FailedReason: Failed message)"
    assert state.to_dict()["conditions"][0]["type"] == "Failed"
