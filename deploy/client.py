"""Submit, watch, read the logs of, and delete finetune-job MPIJobs.

One class, :class:`MPIJobClient`, holds one ``kubernetes.client.ApiClient`` made once from
in-cluster config (a pod with a service account, e.g. the chart's CronJob) or a kubeconfig
and context. Waiting is watch-based with a deadline: a watch on the one MPIJob
(``fieldSelector=metadata.name=NAME``) resumes from the last ``resourceVersion`` when the
server closes it, and relists when the server says that version is gone (410). Every API
failure becomes a named error from ``deploy.errors`` carrying ``namespace/name``.

Example::

    from deploy.client import MPIJobClient
    from deploy import manifest

    client = MPIJobClient(namespace="ml")           # in-cluster, else ~/.kube/config
    run = manifest.build_run(manifest.read("flowers.yaml"), schedule="nightly")  # helm template
    client.submit(run.mpijob, run.config_map)
    state = client.wait(run.name, timeout=6 * 3600)  # JobFailedError / JobTimeoutError
    print(client.logs(run.name))
    client.delete(run.name)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from typing import Any, TextIO

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from deploy import constants as c
from deploy.errors import (
    ApiError,
    BadInputError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    from_api,
)
from deploy.status import JobState, job_state

log = logging.getLogger("finetune_job.deploy")

MPIJOB = f"{c.PLURAL}.{c.GROUP}"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Longest single watch request; the loop re-watches (from the last resourceVersion) until the
# deadline. Well under the API server's own --min-request-timeout (30 min by default).
WATCH_CHUNK_SECONDS = 300


def load_api_client(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None
) -> tuple[k8s.ApiClient, str]:
    """An ApiClient and its default namespace, from in-cluster config or a kubeconfig.

    ``in_cluster=None`` tries the pod's service account first, unless a kubeconfig or a
    context is named, then falls back to ``$KUBECONFIG`` / ``~/.kube/config``.
    """
    if in_cluster or (in_cluster is None and not kubeconfig and not context):
        try:
            cfg = k8s.Configuration()
            k8s_config.load_incluster_config(client_configuration=cfg)
            with open(SA_NAMESPACE_FILE, encoding="utf-8") as fh:
                namespace = fh.read().strip() or "default"
            return k8s.ApiClient(cfg), namespace
        except (ConfigException, OSError) as e:
            if in_cluster:
                raise BadInputError(f"no in-cluster Kubernetes config: {e}") from e
    try:
        api = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
        contexts, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
    except (ConfigException, OSError) as e:
        where = kubeconfig or "$KUBECONFIG or ~/.kube/config"
        raise BadInputError(f"no usable Kubernetes config in {where}: {e}") from e
    chosen = active
    if context:
        chosen = next((ctx for ctx in contexts if ctx["name"] == context), active)
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return api, namespace


class MPIJobClient:
    """The MPIJobs of one namespace, through one API client made once."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        api_client: k8s.ApiClient | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        if api_client is None:
            api_client, default_ns = load_api_client(kubeconfig, context, in_cluster)
        else:
            default_ns = "default"
        self.api_client = api_client
        self.namespace = namespace or default_ns
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.request_timeout = request_timeout

    def _ref(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def _call(
        self, verb: str, resource: str, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Run one API call; failures become named errors ``from`` the exception."""
        kwargs.setdefault("_request_timeout", self.request_timeout)
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise from_api(e, verb, resource, self.namespace, name) from e
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(
                f"{verb} {resource} {self._ref(name)}: cannot reach the API server "
                f"at {self.api_client.configuration.host}: {e}"
            ) from e

    # ---- submit / get / list / delete -----------------------------------------------------
    def submit(self, mpijob: dict[str, Any], config_map: dict[str, Any] | None = None) -> JobState:
        """Create the MPIJob, then its training-config ConfigMap owned by it.

        The ConfigMap carries an ownerReference to the MPIJob, so deleting the job (or its
        TTL) garbage-collects it; the pods wait for the volume until it exists. If the
        ConfigMap cannot be created the MPIJob is deleted again, so nothing half-made stays.
        """
        name = mpijob["metadata"]["name"]
        created = self._call(
            "create",
            MPIJOB,
            name,
            self.custom.create_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            self.namespace,
            c.PLURAL,
            mpijob,
        )
        if config_map is not None:
            owned = dict(
                config_map,
                metadata=dict(
                    config_map["metadata"],
                    ownerReferences=[
                        {
                            "apiVersion": c.API_VERSION,
                            "kind": c.KIND,
                            "name": name,
                            "uid": created["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                ),
            )
            try:
                self._call(
                    "create",
                    "configmaps",
                    owned["metadata"]["name"],
                    self.core.create_namespaced_config_map,
                    self.namespace,
                    owned,
                )
            except Exception:
                self._delete_quietly(name)
                raise
        log.info("submitted MPIJob %s", self._ref(name))
        return job_state(created)

    def _delete_quietly(self, name: str) -> None:
        try:
            self.delete(name)
        except Exception as e:  # the original error matters more; say what is left behind
            log.warning("could not delete MPIJob %s after a failed submit: %s", self._ref(name), e)

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self._call(
            "get",
            MPIJOB,
            name,
            self.custom.get_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            self.namespace,
            c.PLURAL,
            name,
        )
        return obj

    def status(self, name: str) -> JobState:
        return job_state(self.get(name))

    def list_jobs(self, label_selector: str = f"{c.NAME_LABEL}={c.APP_NAME}") -> list[JobState]:
        """This chart's MPIJobs in the namespace, oldest first."""
        doc = self._call(
            "list",
            MPIJOB,
            "",
            self.custom.list_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            self.namespace,
            c.PLURAL,
            label_selector=label_selector,
        )
        states = [job_state(item) for item in doc.get("items", [])]
        return sorted(states, key=lambda s: (s.created, s.name))

    def delete(self, name: str) -> None:
        """Delete the MPIJob; its pods and ConfigMaps go with it (background cascade)."""
        self._call(
            "delete",
            MPIJOB,
            name,
            self.custom.delete_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            self.namespace,
            c.PLURAL,
            name,
            propagation_policy="Background",
        )
        log.info("deleted MPIJob %s", self._ref(name))

    # ---- wait -----------------------------------------------------------------------------
    def wait(
        self, name: str, timeout: float, on_change: Callable[[JobState], None] | None = None
    ) -> JobState:
        """Block until the MPIJob succeeds; returns its final state.

        Raises JobFailedError when it fails, JobTimeoutError after ``timeout`` seconds (the
        job keeps running), NotFoundError when it does not exist or is deleted meanwhile.
        """
        state = self.watch_until(name, time.monotonic() + timeout, lambda s: s.finished, on_change)
        if state is None:
            raise JobTimeoutError(
                f"MPIJob {self._ref(name)} did not finish within "
                f"{round(timeout, 1):g} s (still running; "
                f"`finetune-job delete {name}` stops it)"
            )
        if state.failed:
            raise JobFailedError(f"MPIJob {state.describe()}", state)
        return state

    def watch_until(
        self,
        name: str,
        deadline: float,
        done: Callable[[JobState], bool],
        on_change: Callable[[JobState], None] | None = None,
    ) -> JobState | None:
        """Watch the MPIJob until ``done(state)``; None when ``deadline`` (monotonic) passes."""
        state, rv = self._relist(name)
        last_phase = None
        while True:
            if state.phase != last_phase and on_change is not None:
                on_change(state)
            last_phase = state.phase
            if done(state):
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # One watch request; when the server closes it, the loop resumes from ``rv``.
            events = self._watch_once(name, rv, left)
            try:
                for state, rv in events:  # noqa: B007 - both are used after the loop
                    if done(state) or state.phase != last_phase:
                        break
            except ApiException as e:
                if e.status != 410:
                    raise from_api(e, "watch", MPIJOB, self.namespace, name) from e
                log.info("watch of MPIJob %s expired (410 Gone); relisting", self._ref(name))
                state, rv = self._relist(name)
            except urllib3.exceptions.ReadTimeoutError:
                pass  # no byte within the deadline: the deadline check above decides
            finally:
                events.close()

    def _relist(self, name: str) -> tuple[JobState, str]:
        """The job's current state and the list's resourceVersion to watch from."""
        doc = self._call(
            "list",
            MPIJOB,
            name,
            self.custom.list_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            self.namespace,
            c.PLURAL,
            field_selector=f"metadata.name={name}",
        )
        items = doc.get("items") or []
        if not items:
            raise NotFoundError(f"MPIJob {self._ref(name)} not found")
        return job_state(items[0]), str(doc.get("metadata", {}).get("resourceVersion") or "")

    def _watch_once(
        self, name: str, rv: str, left: float
    ) -> Generator[tuple[JobState, str], None, None]:
        """One watch request (at most ``left`` seconds): (state, resourceVersion) per change."""
        seconds = max(1, min(WATCH_CHUNK_SECONDS, math.ceil(left)))
        watcher = k8s_watch.Watch()
        try:
            for event in watcher.stream(
                self.custom.list_namespaced_custom_object,
                c.GROUP,
                c.VERSION,
                self.namespace,
                c.PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=rv or None,
                allow_watch_bookmarks=True,
                timeout_seconds=seconds,
                _request_timeout=(self.request_timeout, left),
            ):
                obj = event["raw_object"]
                rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
                if event["type"] == "BOOKMARK":
                    continue
                if event["type"] == "DELETED":
                    raise NotFoundError(f"MPIJob {self._ref(name)} was deleted while waiting")
                yield job_state(obj), rv
        finally:
            watcher.stop()

    # ---- logs -----------------------------------------------------------------------------
    def launcher_pods(self, name: str) -> list[Any]:
        """The job's launcher pods (``V1Pod``; one per launcher attempt), oldest first."""
        selector = (
            f"{c.OPERATOR_JOB_NAME_LABEL}={name},{c.OPERATOR_JOB_ROLE_LABEL}={c.LAUNCHER_ROLE}"
        )
        pods: list[Any] = (
            self._call(
                "list",
                "pods",
                name,
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=selector,
            ).items
            or []
        )
        return sorted(pods, key=lambda p: (str(p.metadata.creation_timestamp), p.metadata.name))

    def _launcher(self, name: str) -> tuple[str, str]:
        """(pod name, container name) of the newest launcher pod."""
        pods = self.launcher_pods(name)
        if not pods:
            raise NotFoundError(
                f"MPIJob {self._ref(name)} has no launcher pod (not started yet, "
                f"or its pods were cleaned up)"
            )
        return str(pods[-1].metadata.name), str(pods[-1].spec.containers[0].name)

    def logs(self, name: str, tail_lines: int | None = None) -> str:
        """The newest launcher pod's log; save it before the job (and its pods) is deleted."""
        pod, container = self._launcher(name)
        kwargs: dict[str, Any] = {"container": container}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        text: str = self._call(
            "get", "pods/log", pod, self.core.read_namespaced_pod_log, pod, self.namespace, **kwargs
        )
        return text

    def follow_logs(self, name: str, out: TextIO, deadline: float) -> JobState | None:
        """Wait for the launcher to run, then copy its log to ``out`` as it is written.

        Returns the job's state once the log ends (None if ``deadline`` passed first).
        """
        state = self.watch_until(name, deadline, lambda s: s.phase in (c.RUNNING, *c.TERMINAL))
        if state is None:
            return None
        pod, container = self._launcher(name)
        watcher = k8s_watch.Watch()
        try:
            for line in watcher.stream(
                self.core.read_namespaced_pod_log,
                pod,
                self.namespace,
                container=container,
                _request_timeout=(self.request_timeout, max(1.0, deadline - time.monotonic())),
            ):
                out.write(line + "\n")
                out.flush()
        except ApiException as e:
            raise from_api(e, "get", "pods/log", self.namespace, pod) from e
        except urllib3.exceptions.ReadTimeoutError:
            return None
        finally:
            watcher.stop()
        return self.status(name)
