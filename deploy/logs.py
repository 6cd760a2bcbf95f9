"""The launcher's log of a run: its pods, one attempt after another, as lines.

:class:`LauncherLogs` is a part of ``deploy.client.MPIJobClient``: it reads the run's kind,
its watch (to wait for a launcher to start) and the API client from there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import urllib3
from kubernetes.client.exceptions import ApiException

from deploy import constants as c
from deploy.errors import ApiError, JobTimeoutError, NotFoundError, from_api, server_message
from deploy.status import JobState
from deploy.stuck import StuckBounds, StuckTracker

if TYPE_CHECKING:
    from collections.abc import Callable

    from kubernetes import client as k8s

    from deploy.kinds import Kind


class LauncherLogs:
    """Launcher pods and their logs; ``MPIJobClient`` supplies what is declared here."""

    if TYPE_CHECKING:
        namespace: str
        core: k8s.CoreV1Api
        api_client: k8s.ApiClient
        request_timeout: float

        def _ref(self, name: str) -> str: ...
        def _kind_name(self) -> str: ...
        def kind_of(self, name: str) -> Kind: ...
        def _call(
            self, verb: str, resource: str, name: str, fn: Callable[..., Any], *a: Any, **k: Any
        ) -> Any: ...
        def watch_until(
            self,
            name: str,
            deadline: float,
            done: Callable[[JobState], bool],
            on_change: Callable[[JobState], None] | None = None,
            stuck: StuckBounds | None = None,
            tracker: StuckTracker | None = None,
        ) -> JobState | None: ...

    def _pods(self, name: str, selector: str) -> list[dict[str, Any]]:
        """Pods as the server sent them (dicts), oldest first."""
        resp = self._call(
            "list",
            "pods",
            name,
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
            _preload_content=False,  # no model validation a server's pod could fail
        )
        pods: list[dict[str, Any]] = json.loads(resp.data).get("items") or []
        return sorted(
            pods,
            key=lambda p: (str(p["metadata"].get("creationTimestamp")), p["metadata"]["name"]),
        )

    def launcher_pods(self, name: str) -> list[dict[str, Any]]:
        """The job's launcher pods (one per launcher attempt), oldest first."""
        return self._pods(
            name,
            self.kind_of(name).launcher_pods(name),
        )

    def launcher_pod_names(self, name: str) -> list[str]:
        return [str(p["metadata"]["name"]) for p in self.launcher_pods(name)]

    def _launcher(self, name: str) -> tuple[str, str]:
        """(pod name, container name) of the newest launcher pod."""
        pods = self.launcher_pods(name)
        if not pods:
            raise NotFoundError(
                f"{self._kind_name()} {self._ref(name)} has no launcher pod (not started yet, "
                f"or its pods were cleaned up)"
            )
        return _pod_and_container(pods[-1])

    def logs(
        self,
        name: str,
        *,
        pod: str | None = None,
        follow: bool = False,
        previous: bool = False,
        tail_lines: int | None = None,
        timeout: float = c.WAIT_TIMEOUT,
        stuck: StuckBounds | None = None,
    ) -> Iterator[str]:
        """The launcher's log as lines (no line ends): ``for line in client.logs(run)``.

        ``pod``: one launcher pod by name (see :meth:`launcher_pods`), else the newest.
        ``previous``: the container instance before the last restart. ``follow``: wait for
        the launcher to run (failing with JobStuckError if it cannot start, JobTimeoutError
        after ``timeout`` seconds), then yield lines as they are written until the job ends;
        when a failed launcher is replaced by another pod (``runPolicy.backoffLimit``), a
        :func:`pod_header` line comes before the new pod's lines. Save the log before the
        job (and its pods) is deleted.
        """
        deadline = time.monotonic() + timeout
        if follow and not previous:
            # A TrainJob has no Running condition: its launcher pod running says it.
            kind = self.kind_of(name)
            tracker = StuckTracker(name, StuckBounds() if stuck is None else stuck, kind)

            def launcher_runs(state: JobState) -> bool:
                return state.phase in (c.RUNNING, *c.TERMINAL) or any(
                    (p["metadata"].get("labels") or {}).get(kind.role_label) == kind.launcher_role
                    and (p.get("status") or {}).get("phase") in c.POD_STARTED_PHASES
                    for p in tracker.pods.values()
                )

            state = self.watch_until(name, deadline, launcher_runs, stuck=stuck, tracker=tracker)
            if state is None:
                raise JobTimeoutError(
                    f"{self._kind_name()} {self._ref(name)}: the launcher did not start within "
                    f"{round(timeout, 1):g} s"
                )
        pod_name, container = self._pod_container(name, pod)
        kwargs: dict[str, Any] = {"container": container}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        if previous:
            kwargs["previous"] = True
        if follow and not previous and pod is None:
            return self._follow_attempts(name, pod_name, deadline, kwargs, stuck)
        if follow and not previous:
            return self._follow(name, pod_name, deadline, kwargs)
        return iter(self._read_log(name, pod_name, kwargs))

    def _follow_attempts(
        self,
        name: str,
        pod: str,
        deadline: float,
        kwargs: dict[str, Any],
        stuck: StuckBounds | None,
    ) -> Iterator[str]:
        """Follow the launcher pod, then each pod the launcher Job starts after it."""
        seen = {pod}
        while True:
            yield from self._follow(name, pod, deadline, kwargs)
            following = self._next_launcher(name, seen, deadline, stuck)
            if following is None:
                return
            seen.add(following)
            attempt = self.launcher_pod_names(name).index(following) + 1
            yield pod_header(following, attempt)
            kwargs = {k: v for k, v in kwargs.items() if k != "tail_lines"}
            pod = following

    def _next_launcher(
        self, name: str, seen: set[str], deadline: float, stuck: StuckBounds | None
    ) -> str | None:
        """The next launcher pod once it runs; None when the job finished without one."""
        kind = self.kind_of(name)
        tracker = StuckTracker(name, StuckBounds() if stuck is None else stuck, kind)

        def started() -> bool:
            return any(
                pod_name not in seen
                and (p["metadata"].get("labels") or {}).get(kind.role_label) == kind.launcher_role
                and (p.get("status") or {}).get("phase") in c.POD_STARTED_PHASES
                for pod_name, p in tracker.pods.items()
            )

        state = self.watch_until(
            name, deadline, lambda s: s.finished or started(), stuck=stuck, tracker=tracker
        )
        if state is None:
            raise JobTimeoutError(
                f"{self._kind_name()} {self._ref(name)}: following the launcher's log took "
                "longer than the deadline"
            )
        # Also after the job finished: an attempt that ran meanwhile is shown too.
        unseen = [p for p in self.launcher_pod_names(name) if p not in seen]
        return unseen[0] if unseen else None

    def _pod_container(self, name: str, pod: str | None) -> tuple[str, str]:
        if pod is None:
            return self._launcher(name)
        for candidate in self.launcher_pods(name):
            if candidate["metadata"]["name"] == pod:
                return _pod_and_container(candidate)
        raise NotFoundError(f"{self._kind_name()} {self._ref(name)} has no launcher pod {pod}")

    def _read_log(self, name: str, pod: str, kwargs: dict[str, Any]) -> list[str]:
        try:
            resp: Any = self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                _preload_content=False,
                _request_timeout=self.request_timeout,
                **kwargs,
            )
        except ApiException as e:
            if e.status == 400 and kwargs.get("previous"):
                # The API says 400 when the container never restarted: nothing to show.
                raise NotFoundError(
                    f"launcher pod {self._ref(pod)} of {self._kind_name()} {name} has no previous "
                    f"container (it did not restart): {server_message(e)}"
                ) from e
            raise from_api(e, "get", "pods/log", self.namespace, pod) from e
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(
                f"get pods/log {self._ref(pod)}: cannot reach the API server "
                f"at {self.api_client.configuration.host}: {e}"
            ) from e
        return split_lines(resp.data.decode("utf-8", errors="replace"))

    def _follow(
        self, name: str, pod: str, deadline: float, kwargs: dict[str, Any]
    ) -> Iterator[str]:
        """Lines of the pod's log as they are written, until the container ends."""
        try:
            resp = self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                follow=True,
                _preload_content=False,
                # read timeout: the time left, so a silent launcher cannot outlast the deadline
                _request_timeout=(self.request_timeout, max(1.0, deadline - time.monotonic())),
                **kwargs,
            )
        except ApiException as e:
            raise from_api(e, "get", "pods/log", self.namespace, pod) from e
        return self._lines(name, pod, resp, deadline)

    def _lines(self, name: str, pod: str, resp: Any, deadline: float) -> Iterator[str]:
        pending = b""
        try:
            for chunk in resp.stream(amt=None, decode_content=False):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
                if time.monotonic() > deadline:
                    raise JobTimeoutError(
                        f"{self._kind_name()} {self._ref(name)}: following the log of {pod} "
                        f"took longer than the deadline"
                    )
            if pending:  # the last line had no line end
                yield pending.decode("utf-8", errors="replace")
        except urllib3.exceptions.ReadTimeoutError as e:
            raise JobTimeoutError(
                f"{self._kind_name()} {self._ref(name)}: no log line from {pod} before the deadline"
            ) from e
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(
                f"log of {self._ref(pod)} ({self._kind_name()} {name}) broke off: {e}"
            ) from e
        finally:
            resp.release_conn()

    def launcher_log_text(self, name: str) -> str:
        """Every launcher pod's log, oldest first; a header line before each when several."""
        pods = self.launcher_pod_names(name)
        if not pods:
            raise NotFoundError(f"{self._kind_name()} {self._ref(name)} has no launcher pod")
        out = []
        for i, pod in enumerate(pods, 1):
            if len(pods) > 1:
                out.append(pod_header(pod, i, len(pods)))
            out += self.logs(name, pod=pod)
        return "".join(line + "\n" for line in out)


def _pod_and_container(pod: dict[str, Any]) -> tuple[str, str]:
    """The launcher pod's name and its (first, the launcher's) container."""
    return str(pod["metadata"]["name"]), str(pod["spec"]["containers"][0]["name"])


def split_lines(text: str) -> list[str]:
    """Lines without their ends; only ``\\n`` ends a line (a progress bar's ``\\r`` does not)."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def pod_header(pod: str, attempt: int, attempts: int | None = None) -> str:
    """The line before one launcher pod's log when a run has several."""
    of = f" of {attempts}" if attempts else ""
    return f"===== launcher pod {pod} (attempt {attempt}{of}) ====="
