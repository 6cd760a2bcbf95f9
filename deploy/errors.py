"""Named failures of the Kubernetes side, each message naming ``namespace/name``.

Every error carries its exit code from the one table, ``job.exitcodes``, and API failures
are re-raised ``from`` the ``ApiException``. ``GateError`` is the registry's
(``job.errors``), re-exported here for callers of the client.
"""

from __future__ import annotations

import json
from typing import Any

from job.errors import GateError, InputError, JobError
from job.exitcodes import ExitCode

__all__ = ["GateError"]


class DeployError(JobError):
    """A failure reported in one line; the base of every error below."""

    exit_code = ExitCode.FAILED


class BadInputError(DeployError, InputError):
    """A bad manifest or values, a bad ``--set``, no kubeconfig: nothing was submitted."""

    exit_code = ExitCode.BAD_INPUT


class JobFailedError(DeployError, RuntimeError):
    """The MPIJob reached the Failed condition."""

    def __init__(self, message: str, state: Any = None) -> None:
        super().__init__(message)
        self.state = state


class JobStuckError(JobFailedError):
    """A pod of the run cannot start and the MPI Operator sets no condition for it.

    An image that cannot be pulled, a missing Secret/ConfigMap/ServiceAccount, a volume that
    cannot mount, or no node that fits: the job would sit in Pending until the wait's timeout.
    ``pod`` is empty when no pod could be created at all (``subject`` then names the Job).
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str,
        name: str,
        subject: str,
        pod: str = "",
        container: str = "",
        reason: str = "",
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.namespace, self.name = namespace, name
        self.subject, self.pod, self.container = subject, pod, container
        self.reason, self.detail = reason, detail


class JobTimeoutError(DeployError, TimeoutError):
    """The deadline passed before the MPIJob succeeded or failed; it keeps running."""

    exit_code = ExitCode.TIMED_OUT


class NotFoundError(DeployError, LookupError):
    """The object does not exist (HTTP 404)."""

    exit_code = ExitCode.BAD_INPUT


class AlreadyExistsError(DeployError):
    """An object of that name exists already (HTTP 409)."""

    exit_code = ExitCode.BAD_INPUT


class PermissionDeniedError(DeployError):
    """The API server refused the request for this identity (HTTP 401/403, RBAC)."""

    exit_code = ExitCode.BAD_INPUT


class ApiError(DeployError):
    """Any other API failure (5xx, unexpected status)."""


def server_message(e: Any) -> str:
    """The ``message`` of a Kubernetes ``Status`` body, else the HTTP reason."""
    body = getattr(e, "body", None)
    if body:
        try:
            doc = json.loads(body)
        except (TypeError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    return str(getattr(e, "reason", "") or e).strip()


def from_api(e: Any, verb: str, resource: str, namespace: str, name: str = "") -> DeployError:
    """The named error for an ``ApiException``; raise it ``from e``."""
    where = f"{namespace}/{name}" if name else f"namespace {namespace}"
    status = getattr(e, "status", None)
    detail = server_message(e)
    if status == 404:
        return NotFoundError(f"{resource} {where} not found")
    if status == 409:
        return AlreadyExistsError(f"{resource} {where} already exists: {detail}")
    if status in (401, 403):
        return PermissionDeniedError(
            f"permission denied: cannot {verb} {resource} {where} (HTTP {status}); "
            f"grant this identity '{verb}' on {resource} in namespace {namespace} "
            f"(the chart's CronJob Role does): {detail}"
        )
    return ApiError(f"{verb} {resource} {where} failed (HTTP {status}): {detail}")
