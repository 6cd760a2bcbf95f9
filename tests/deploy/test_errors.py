"""API failures become named errors with namespace/name and the documented exit codes."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from deploy import errors
from job.exitcodes import ExitCode


def api_exc(status: int, message: str) -> ApiException:
    e = ApiException(status=status, reason="Reason")
    e.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return e


@pytest.mark.parametrize(
    ("status", "kind", "code", "text"),
    [
        (404, errors.NotFoundError, ExitCode.BAD_INPUT, "mpijobs.kubeflow.org ml/r1 not found"),
        (409, errors.AlreadyExistsError, ExitCode.BAD_INPUT, "ml/r1 already exists: server says"),
        (
            403,
            errors.PermissionDeniedError,
            ExitCode.BAD_INPUT,
            "permission denied: cannot create mpijobs.kubeflow.org "
            "ml/r1 (HTTP 403); grant this identity 'create'",
        ),
        (401, errors.PermissionDeniedError, ExitCode.BAD_INPUT, "HTTP 401"),
        (
            500,
            errors.ApiError,
            ExitCode.FAILED,
            "create mpijobs.kubeflow.org ml/r1 failed (HTTP 500): server says",
        ),
    ],
    ids=["404", "409", "403", "401", "500"],
)
def test_from_api(status, kind, code, text):
    err = errors.from_api(
        api_exc(status, "server says"), "create", "mpijobs.kubeflow.org", "ml", "r1"
    )
    assert isinstance(err, kind)
    assert err.exit_code == code
    assert text in str(err)


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (errors.JobFailedError, ExitCode.FAILED),
        (errors.JobStuckError, ExitCode.FAILED),
        (errors.GateError, ExitCode.GATE_REFUSED),
        (errors.JobTimeoutError, ExitCode.TIMED_OUT),
        (errors.BadInputError, ExitCode.BAD_INPUT),
        (errors.NotFoundError, ExitCode.BAD_INPUT),
    ],
    ids=["failed", "stuck", "gate", "timeout", "bad-input", "not-found"],
)
def test_exit_codes(kind, code):
    assert kind.exit_code == code


@pytest.mark.parametrize(
    ("kind", "builtin"),
    [
        (errors.JobTimeoutError, TimeoutError),
        (errors.NotFoundError, LookupError),
        (errors.JobFailedError, RuntimeError),
        (errors.JobStuckError, RuntimeError),
    ],
    ids=["timeout", "not-found", "failed", "stuck"],
)
def test_errors_are_the_builtins_callers_catch(kind, builtin):
    assert issubclass(kind, builtin) and issubclass(kind, errors.DeployError)


def test_server_message_falls_back_to_reason():
    assert errors.server_message(ApiException(status=502, reason="Bad Gateway")) == "Bad Gateway"
