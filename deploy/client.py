"""Submit, watch, read the logs of, and delete finetune-job MPIJobs.

One class, :class:`MPIJobClient`, holds one ``kubernetes.client.ApiClient`` made once from
in-cluster config (a pod with a service account, e.g. the chart's CronJob) or a kubeconfig
and context. Waiting is watch-based with a deadline: watches on the one MPIJob
(``fieldSelector=metadata.name=NAME``), its pods and the namespace's Warning events
(``deploy.watches``) resume from the last ``resourceVersion`` when the server closes them,
and relist when the server says that version is gone (410). A pod that cannot start (image
pull, missing Secret, no node fits; the MPI Operator sets no condition for those) ends the
wait with JobStuckError after a bound (``deploy.stuck.StuckBounds``). Every API failure
becomes a named error from ``deploy.errors`` carrying ``namespace/name``. The launcher's
logs are read by its part ``deploy.logs.LauncherLogs``.

Example::

    from deploy.client import MPIJobClient
    from deploy import manifest

    client = MPIJobClient(namespace="ml")           # in-cluster, else ~/.kube/config
    run = manifest.build_run(manifest.read("flowers.yaml"), schedule="nightly")  # helm template
    client.submit(run.job, run.config_map)
    state = client.wait(run.name, timeout=6 * 3600)  # JobFailedError / JobTimeoutError
    for line in client.logs(run.name):              # follow=True: as it is written
        print(line)
    client.delete(run.name)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from deploy import constants as c
from deploy import kinds
from deploy.errors import (
    ApiError,
    BadInputError,
    DeployError,
    JobFailedError,
    JobStuckError,
    JobTimeoutError,
    NotFoundError,
    from_api,
)
from deploy.kinds import Kind
from deploy.logs import LauncherLogs
from deploy.status import JobState, job_state
from deploy.stuck import Problem, StuckBounds, StuckTracker, pod_problems
from deploy.watches import ERROR, RELIST, Feed, Item

log = logging.getLogger("finetune_job.deploy")

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


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


class MPIJobClient(LauncherLogs):
    """The runs (MPIJobs or TrainJobs, ``deploy.kinds``) of one namespace, through one API
    client made once. ``kind`` fixes the kind; by default a run's kind is found by looking it
    up (MPIJob first), and ``submit`` takes the object's."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        api_client: k8s.ApiClient | None = None,
        request_timeout: float = 30.0,
        kind: Kind | None = None,
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
        self.kind = kind

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
    def submit(self, job: dict[str, Any], config_map: dict[str, Any] | None = None) -> JobState:
        """Create the run (an MPIJob or a TrainJob), then its training-config ConfigMap
        owned by it.

        The ConfigMap carries an ownerReference to the run, so deleting the run (or its
        TTL) garbage-collects it; the pods wait for the volume until it exists. If the
        ConfigMap cannot be created the run is deleted again, so nothing half-made stays.
        """
        kind = self.kind = kinds.of(job)
        name = job["metadata"]["name"]
        created = self._call(
            "create",
            kind.resource,
            name,
            self.custom.create_namespaced_custom_object,
            kind.group,
            kind.version,
            self.namespace,
            kind.plural,
            job,
        )
        if config_map is not None:
            owned = dict(
                config_map,
                metadata=dict(
                    config_map["metadata"],
                    ownerReferences=[
                        {
                            "apiVersion": kind.api_version,
                            "kind": kind.name,
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
        log.info("submitted %s %s", kind.name, self._ref(name))
        return job_state(created)

    def _delete_quietly(self, name: str) -> None:
        try:
            self.delete(name)
        except Exception as e:  # the original error matters more; say what is left behind
            log.warning(
                "could not delete %s %s after a failed submit: %s",
                self._kind_name(),
                self._ref(name),
                e,
            )

    def get(self, name: str) -> dict[str, Any]:
        """The run as the API returns it; its kind is learnt on the way (MPIJob first)."""
        missing: NotFoundError | None = None
        for kind in (self.kind,) if self.kind else kinds.KINDS:
            try:
                obj: dict[str, Any] = self._call(
                    "get",
                    kind.resource,
                    name,
                    self.custom.get_namespaced_custom_object,
                    kind.group,
                    kind.version,
                    self.namespace,
                    kind.plural,
                    name,
                )
            except NotFoundError as e:
                missing = missing or e
                continue
            self.kind = kind
            return obj
        assert missing is not None
        raise missing

    def kind_of(self, name: str) -> Kind:
        """The kind of run ``name`` (one GET when the client does not know it yet)."""
        if self.kind is None:
            self.get(name)
        assert self.kind is not None
        return self.kind

    def _kind_name(self) -> str:
        return self.kind.name if self.kind else "run"

    def status(self, name: str) -> JobState:
        return job_state(self.get(name))

    def list_jobs(self, label_selector: str = f"{c.NAME_LABEL}={c.APP_NAME}") -> list[JobState]:
        """This chart's runs in the namespace (both kinds, unless the client has one), oldest
        first. A kind whose CRD is not installed has none."""
        chosen = (self.kind,) if self.kind else kinds.KINDS
        states: list[JobState] = []
        missing: list[NotFoundError] = []
        for kind in chosen:
            try:
                doc = self._call(
                    "list",
                    kind.resource,
                    "",
                    self.custom.list_namespaced_custom_object,
                    kind.group,
                    kind.version,
                    self.namespace,
                    kind.plural,
                    label_selector=label_selector,
                )
            except NotFoundError as e:  # that kind's CRD is not installed
                missing.append(e)
                continue
            states += [job_state(item) for item in doc.get("items", [])]
        if len(missing) == len(chosen):
            raise missing[0]
        return sorted(states, key=lambda s: (s.created, s.name))

    def delete(self, name: str) -> None:
        """Delete the run; its pods and ConfigMaps go with it (background cascade)."""
        kind = self.kind_of(name)
        self._call(
            "delete",
            kind.resource,
            name,
            self.custom.delete_namespaced_custom_object,
            kind.group,
            kind.version,
            self.namespace,
            kind.plural,
            name,
            propagation_policy="Background",
        )
        log.info("deleted %s %s", kind.name, self._ref(name))

    # ---- wait -----------------------------------------------------------------------------
    def wait(
        self,
        name: str,
        timeout: float,
        on_change: Callable[[JobState], None] | None = None,
        stuck: StuckBounds | None = None,
    ) -> JobState:
        """Block until the run succeeds; returns its final state.

        Raises JobFailedError when it fails; JobStuckError (a JobFailedError) when one of its
        pods cannot start for longer than ``stuck`` allows (default: :class:`StuckBounds`);
        JobTimeoutError (a TimeoutError) after ``timeout`` seconds (the job keeps running);
        NotFoundError (a LookupError) when it does not exist or is deleted meanwhile.
        """
        state = self.watch_until(
            name, time.monotonic() + timeout, lambda s: s.finished, on_change, stuck
        )
        if state is None:
            raise JobTimeoutError(
                f"{self._kind_name()} {self._ref(name)} did not finish within "
                f"{round(timeout, 1):g} s (still running; "
                f"`finetune-job delete {name}` stops it)"
            )
        if state.failed:
            raise JobFailedError(f"{state.kind} {state.describe()}", state)
        return state

    def watch_until(
        self,
        name: str,
        deadline: float,
        done: Callable[[JobState], bool],
        on_change: Callable[[JobState], None] | None = None,
        stuck: StuckBounds | None = None,
        tracker: StuckTracker | None = None,
    ) -> JobState | None:
        """Watch the run (and its pods) until ``done(state)``; None once ``deadline`` passes.

        The run's pods and the namespace's Warning events are watched too, so a run that
        cannot start fails with JobStuckError instead of waiting out the deadline. ``done``
        is asked after every change, so it may look at ``tracker.pods`` too.
        """
        kind = self.kind_of(name)
        bounds = StuckBounds() if stuck is None else stuck
        watch_pods = tracker is not None or bounds.start > 0 or bounds.unschedulable > 0
        tracker = tracker or StuckTracker(name, bounds, kind)
        with Feed(self.request_timeout) as feed:
            self._start_watches(feed, name, watch_pods=watch_pods)
            state: JobState | None = None
            last_phase = None
            while True:
                now = time.monotonic()
                if state is not None:
                    if state.phase != last_phase and on_change is not None:
                        on_change(state)
                    last_phase = state.phase
                    if done(state):
                        return state
                    problem = tracker.overdue(now)
                    if problem is not None:
                        raise self._stuck(name, problem, bounds.of(problem.kind))
                if now >= deadline:
                    return None
                due = tracker.next_due() if state is not None else None
                wake = min(deadline, due or deadline)
                item = feed.get(wake - now)
                if item is not None:
                    state = self._take(name, item, state, tracker)

    def _start_watches(self, feed: Feed, name: str, watch_pods: bool) -> None:
        kind = self.kind_of(name)
        feed.watch(
            "job",
            self.custom.list_namespaced_custom_object,
            kind.group,
            kind.version,
            self.namespace,
            kind.plural,
            field_selector=f"metadata.name={name}",
        )
        if not watch_pods:
            return
        feed.watch(
            "pods",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=kind.run_pods(name),
        )
        # Pods that could not be created exist only as events (on the launcher Job, on the
        # MPIJob); Warning events of the namespace are few, and filtered by the tracker.
        feed.watch(
            "events", self.core.list_namespaced_event, self.namespace, field_selector="type=Warning"
        )

    def _take(
        self, name: str, item: Item, state: JobState | None, tracker: StuckTracker
    ) -> JobState | None:
        """Apply one watch item; returns the job's (possibly new) state."""
        now = time.monotonic()
        if item.type == ERROR:
            self._watch_failed(name, item)
        elif item.source == "job":
            if item.type == RELIST:
                if not item.obj:
                    raise NotFoundError(f"{self._kind_name()} {self._ref(name)} not found")
                return job_state(item.obj[0])
            if item.type == "DELETED":
                raise NotFoundError(
                    f"{self._kind_name()} {self._ref(name)} was deleted while waiting"
                )
            return job_state(item.obj)
        elif item.source == "pods":
            if item.type == RELIST:
                tracker.relist_pods(item.obj, now)
            else:
                tracker.pod(item.type, item.obj, now)
        elif item.source == "events":
            for event in item.obj if item.type == RELIST else [item.obj]:
                tracker.event(event, now)
        return state

    def _watch_failed(self, name: str, item: Item) -> None:
        """The run's watch failing ends the wait; the pods' or events' only warns."""
        e = item.obj
        resource = self.kind_of(name).resource if item.source == "job" else item.source
        if isinstance(e, ApiException):
            err: DeployError = from_api(e, "watch", resource, self.namespace, name)
        elif isinstance(e, urllib3.exceptions.HTTPError):
            err = ApiError(
                f"watch {resource} of {self._ref(name)}: cannot reach the API server "
                f"at {self.api_client.configuration.host}: {e}"
            )
        else:
            err = ApiError(f"watch {resource} of {self._ref(name)} failed: {e}")
        if item.source == "job":
            raise err from e
        log.warning("%s; pods that cannot start are not detected", err)

    def _stuck(self, name: str, problem: Problem, bound: float) -> JobStuckError:
        return JobStuckError(
            f"{self._kind_name()} {self._ref(name)} cannot start: {problem.describe(bound)} "
            f"(the job is left as it is; `finetune-job delete {name}` removes it)",
            namespace=self.namespace,
            name=name,
            subject=problem.subject,
            pod=problem.pod,
            container=problem.container,
            reason=problem.reason,
            detail=problem.message,
        )

    def problems(self, name: str) -> list[Problem]:
        """What keeps the run's pods from starting right now (no time bound applied)."""
        pods = self._pods(name, self.kind_of(name).run_pods(name))
        return [p for pod in pods for p in pod_problems(pod)]
