"""A FAKE Kubernetes API server for tests: just the endpoints ``deploy.client`` uses.

The client runs against the real kube-apiserver, controllers and MPI Operator in
tests/cluster (a run's life, RBAC, watches across restarts and 410 Gone, the CronJob, Kueue).
What stays here is what that cluster's tests do not produce yet, and what it cannot:

- pod states only a kubelet reports: image pulls that back off, a missing Secret or volume
  (CreateContainerConfigError, FailedMount), a launcher container that restarts, with the
  log of its previous instance, and a log that grows while it is followed. The kwok nodes
  run no containers; the cluster's real node (tests/cluster/test_real_node.py) can produce
  every one of these, and these cases are the next to move there;
- TrainJobs going through Trainer's conditions with JobSet's pods (no Trainer or JobSet
  controller in the local cluster);
- a permission taken away for one verb in the middle of a run (``forbid``), and a pods
  watch that expires (410) while pods are in trouble.

It is not a Kubernetes implementation; it serves only:

- ``/apis/kubeflow.org/v2beta1/namespaces/{ns}/mpijobs[/{name}]``: create (201/409), get,
  list (``labelSelector``, ``fieldSelector=metadata.name=``), watch (``?watch=true``: chunked
  JSON lines from ``resourceVersion``, ending after ``timeoutSeconds``), delete (cascades to
  the ConfigMaps it owns and its pods, as the garbage collector would);
- ``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]``: the same for
  TrainJobs, whose conditions are Trainer's (Created, Complete, Failed; no Running) and
  whose pods carry JobSet's labels (``jobset.sigs.k8s.io/jobset-name``,
  ``jobset.sigs.k8s.io/replicatedjob-name``: launcher or node);
- ``/api/v1/namespaces/{ns}/configmaps[/{name}]``: create, get;
- ``/api/v1/namespaces/{ns}/pods``: list, watch; ``.../pods/{name}/log``: logs (``follow``,
  ``tailLines``, ``previous``: the container instance before the last restart);
- ``/api/v1/namespaces/{ns}/events``: list, watch (``fieldSelector`` on ``type``,
  ``involvedObject.name``, ...), as the kubelet, the Job controller and the MPI Operator
  write them.

Pods that cannot start are scripted with ``waiting(...)`` (a container's waiting reason,
e.g. ImagePullBackOff or CreateContainerConfigError), ``unschedulable(...)`` (PodScheduled
False) and ``warning(...)`` (an Event: FailedCreate on the launcher Job when its
ServiceAccount is missing, FailedMount on a pod whose Secret is missing).

Knobs for failure cases: ``forbid(verb, resource)`` answers 403 like RBAC does;
``expire_next_watches(n)`` answers the next ``n`` watches with an ERROR event 410 Gone and
compacts history (a resume from an older resourceVersion gets 410 too, forcing a relist).
Job lifecycles are scripted
with ``script(...)`` steps that run on create, e.g. ``[(0.1, running("log line")),
(0.2, succeeded())]``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-token"
WATCH_CAP_SECONDS = 30.0  # a watch ends after this long at most; the client resumes it
MPIJOBS = "mpijobs"
TRAINJOBS = "trainjobs"
JOBS = (MPIJOBS, TRAINJOBS)  # the run kinds
CONFIGMAPS = "configmaps"
PODS = "pods"
EVENTS = "events"
_ROUTES = [
    (re.compile(r"^/apis/kubeflow\.org/v2beta1/namespaces/([^/]+)/(mpijobs)(?:/([^/]+))?$"), None),
    (
        re.compile(
            r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/(trainjobs)(?:/([^/]+))?$"
        ),
        None,
    ),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(configmaps)(?:/([^/]+))?$"), None),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(pods)(?:/([^/]+))?$"), None),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(pods)/([^/]+)/log$"), "log"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(events)(?:/([^/]+))?$"), None),
]
_GROUPS = {
    MPIJOBS: ("kubeflow.org", "kubeflow.org/v2beta1", "MPIJob"),
    TRAINJOBS: ("trainer.kubeflow.org", "trainer.kubeflow.org/v1alpha1", "TrainJob"),
    CONFIGMAPS: ("", "v1", "ConfigMap"),
    PODS: ("", "v1", "Pod"),
    EVENTS: ("", "v1", "Event"),
}

Step = tuple[float, Callable[["FakeApiServer", str, str], None]]
# The labels each controller puts on a run's pods: (run name label, role label, roles).
POD_LABELS = {
    MPIJOBS: ("training.kubeflow.org/job-name", "training.kubeflow.org/job-role"),
    TRAINJOBS: ("jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name"),
}
# Role names (launcher, worker) and condition types as each kind spells them.
ROLES = {
    MPIJOBS: {"launcher": "launcher", "worker": "worker"},
    TRAINJOBS: {"launcher": "launcher", "worker": "node"},
}
CONDITIONS = {
    MPIJOBS: {},
    TRAINJOBS: {"Succeeded": "Complete", "Running": None, "Restarting": None},
}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_doc(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def matches_labels(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def matches_fields(obj: dict[str, Any], selector: str) -> bool:
    """``metadata.name=x,type=Warning,involvedObject.name=y``: dotted paths into the object."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        field: Any = obj
        for part in key.split("."):
            field = field.get(part) if isinstance(field, dict) else None
        if field != value:
            return False
    return True


class FakeApiServer:
    """A fake API server on 127.0.0.1 (port 0); ``with FakeApiServer() as api: api.url``."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.rv = 100
        self.compacted = 0
        self.expire_watches = 0
        self.expire_resource = MPIJOBS
        self.forbidden: set[tuple[str, str]] = set()
        self.steps: list[Step] = []
        self.cond = threading.Condition()
        self.stopping = False
        self._timers: list[threading.Thread] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- knobs used by tests -------------------------------------------------------------
    def forbid(self, verb: str, resource: str) -> None:
        self.forbidden.add((verb, resource))

    def expire_next_watches(self, n: int = 1, resource: str = MPIJOBS) -> None:
        with self.cond:
            self.expire_watches = n
            self.expire_resource = resource

    def script(self, steps: list[Step]) -> None:
        """Steps (delay in seconds from create, action) run for every run (MPIJob or
        TrainJob) created."""
        self.steps = steps

    def watch_requests(self) -> list[dict[str, str]]:
        return [
            q
            for m, p, q in self.requests
            if m == "GET" and q.get("watch") == "true" and p.endswith("/" + MPIJOBS)
        ]

    # ---- state changes (also used by scripted steps) ---------------------------------------
    def put(self, resource: str, ns: str, obj: dict[str, Any], event: str) -> dict[str, Any]:
        with self.cond:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if event == "DELETED":
                self.objects.pop((resource, ns, obj["metadata"]["name"]), None)
            else:
                self.objects[(resource, ns, obj["metadata"]["name"])] = obj
            self.events.append((self.rv, resource, ns, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return copy.deepcopy(obj)

    def create(self, resource: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        group, api_version, kind = _GROUPS[resource]
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now())
        return self.put(resource, ns, obj, "ADDED")

    def set_condition(
        self,
        ns: str,
        name: str,
        kind: str,
        reason: str = "",
        message: str = "",
        status: str = "True",
    ) -> None:
        with self.cond:
            resource = self.job_resource(ns, name)
            kind = CONDITIONS[resource].get(kind, kind)
            if kind is None:  # a condition this kind does not have
                return
            obj = copy.deepcopy(self.objects[(resource, ns, name)])
            conds = obj.setdefault("status", {}).setdefault("conditions", [])
            conds[:] = [c for c in conds if c["type"] != kind]
            if kind in ("Succeeded", "Complete", "Failed"):
                for c in conds:
                    if c["type"] == "Running":
                        c["status"] = "False"
                obj["status"]["completionTime"] = now()
            conds.append(
                {
                    "type": kind,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now(),
                    "lastUpdateTime": now(),
                }
            )
            self.put(resource, ns, obj, "MODIFIED")

    def job_resource(self, ns: str, name: str) -> str:
        """mpijobs or trainjobs: the kind of run ``name`` (mpijobs when there is none)."""
        return next((r for r in JOBS if (r, ns, name) in self.objects), MPIJOBS)

    def pod_labels(self, ns: str, name: str, role: str) -> dict[str, str]:
        """The labels the run's controller gives a pod of ``role`` (launcher or worker)."""
        resource = self.job_resource(ns, name)
        run_label, role_label = POD_LABELS[resource]
        return {run_label: name, role_label: ROLES[resource][role]}

    def add_pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str],
        logs: str = "",
        phase: str = "Running",
        status: dict[str, Any] | None = None,
        previous_logs: str | None = None,
    ) -> None:
        role_labels = [role for _, role in POD_LABELS.values()]
        container = next((labels[k] for k in role_labels if k in labels), "launcher")
        pod = {
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": container, "image": "finetune-job"}]},
            "status": {"phase": phase, **(status or {})},
            "logs": logs,
        }
        if previous_logs is not None:
            pod["previous_logs"] = previous_logs
        self.create(PODS, ns, pod)

    def set_pod_status(self, ns: str, name: str, phase: str, **status: Any) -> None:
        """Replace a pod's status (a MODIFIED event), as the kubelet or scheduler would."""
        with self.cond:
            pod = copy.deepcopy(self.objects[(PODS, ns, name)])
            pod["status"] = {"phase": phase, **status}
            self.put(PODS, ns, pod, "MODIFIED")

    def add_event(
        self, ns: str, kind: str, name: str, reason: str, message: str, type_: str = "Warning"
    ) -> None:
        """A core/v1 Event about ``kind``/``name``."""
        self.create(
            EVENTS,
            ns,
            {
                "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}"},
                "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                "reason": reason,
                "message": message,
                "type": type_,
                "count": 1,
                "firstTimestamp": now(),
                "lastTimestamp": now(),
                "source": {"component": "fake"},
            },
        )

    def _run_steps(self, ns: str, name: str) -> None:
        start = time.monotonic()
        for delay, action in self.steps:
            with self.cond:
                self.cond.wait_for(
                    lambda: self.stopping,  # noqa: B023 - evaluated right here
                    timeout=max(0.0, start + delay - time.monotonic()),
                )
                if self.stopping or not any((r, ns, name) in self.objects for r in JOBS):
                    return
            action(self, ns, name)

    # ---- request handling ------------------------------------------------------------------
    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        # Read the body first, whatever the answer: the connection is kept alive.
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        self.requests.append((method, parts.path, query))
        if req.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _send(req, 401, status_doc(401, "Unauthorized", "Unauthorized"))
        for pattern, kind in _ROUTES:
            m = pattern.match(parts.path)
            if m:
                ns, resource, name, sub = m.group(1), m.group(2), m.group(3), kind
                break
        else:
            return _send(
                req,
                404,
                status_doc(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource {parts.path}",
                ),
            )
        verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if name else "list")
        if query.get("watch") == "true":
            verb = "watch"
        target = "pods/log" if sub else resource
        if (verb, target) in self.forbidden:
            group = _GROUPS[resource][0]
            return _send(
                req,
                403,
                status_doc(
                    403,
                    "Forbidden",
                    (
                        f'{resource}{"." + group if group else ""} "{name or ""}" is forbidden: '
                        f'User "system:serviceaccount:{ns}:finetune-job" cannot {verb} resource '
                        f'"{target}" '
                        f'in API group "{group}" in the namespace "{ns}"'
                    ),
                ),
            )
        if sub == "log":
            return self._log(req, ns, name, query)
        if method == "POST":
            return self._create(req, resource, ns, json.loads(body))
        if method == "DELETE":
            return self._delete(req, resource, ns, name)
        if name:
            obj = self.objects.get((resource, ns, name))
            if obj is None:
                return _send(req, 404, _not_found(resource, name))
            return _send(req, 200, _public(obj))
        if verb == "watch":
            return self._watch(req, resource, ns, query)
        return _send(req, 200, self._list(resource, ns, query))

    def _create(
        self, req: BaseHTTPRequestHandler, resource: str, ns: str, body: dict[str, Any]
    ) -> None:
        name = body.get("metadata", {}).get("name", "")
        if (resource, ns, name) in self.objects:
            group = _GROUPS[resource][0]
            return _send(
                req,
                409,
                status_doc(
                    409,
                    "AlreadyExists",
                    f'{resource}{"." + group if group else ""} "{name}" already exists',
                ),
            )
        obj = self.create(resource, ns, body)
        if resource in JOBS and self.steps:
            thread = threading.Thread(target=self._run_steps, args=(ns, name), daemon=True)
            thread.start()
        return _send(req, 201, _public(obj))

    def _delete(self, req: BaseHTTPRequestHandler, resource: str, ns: str, name: str) -> None:
        obj = self.objects.get((resource, ns, name))
        if obj is None:
            return _send(req, 404, _not_found(resource, name))
        uid = obj["metadata"]["uid"]
        self.put(resource, ns, copy.deepcopy(obj), "DELETED")
        # What the garbage collector would do: owned objects and the job's pods go too.
        for (res, ons, _), other in list(self.objects.items()):
            owners = [o.get("uid") for o in other["metadata"].get("ownerReferences", [])]
            labels = other["metadata"].get("labels", {})
            job_label = labels.get(POD_LABELS.get(resource, POD_LABELS[MPIJOBS])[0])
            if ons == ns and (uid in owners or (res == PODS and job_label == name)):
                self.put(res, ons, copy.deepcopy(other), "DELETED")
        return _send(
            req,
            200,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Success",
                "details": {"name": name, "kind": resource, "uid": uid},
            },
        )

    def _list(self, resource: str, ns: str, query: dict[str, str]) -> dict[str, Any]:
        _, api_version, kind = _GROUPS[resource]
        items = [
            _public(o)
            for (res, ons, _), o in sorted(self.objects.items())
            if res == resource and ons == ns and self._selected(o, query)
        ]
        return {
            "kind": kind + "List",
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    @staticmethod
    def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
        return matches_labels(
            obj["metadata"].get("labels", {}), query.get("labelSelector", "")
        ) and matches_fields(obj, query.get("fieldSelector", ""))

    def _watch(
        self, req: BaseHTTPRequestHandler, resource: str, ns: str, query: dict[str, str]
    ) -> None:
        timeout = min(float(query.get("timeoutSeconds") or 1e9), WATCH_CAP_SECONDS)
        deadline = time.monotonic() + timeout
        since = int(query.get("resourceVersion") or 0)
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        try:
            for event in self._events(resource, ns, query, since, deadline):
                _chunk(req, (json.dumps(event) + "\n").encode())
            _chunk(req, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _events(
        self, resource: str, ns: str, query: dict[str, str], since: int, deadline: float
    ) -> Iterator[dict[str, Any]]:
        with self.cond:
            if since and since < self.compacted:
                yield _gone(since)
                return
            if not since:  # no resourceVersion: current state first, as synthetic ADDED
                for obj in self._list(resource, ns, query)["items"]:
                    yield {"type": "ADDED", "object": obj}
                since = self.rv
            if self.expire_watches > 0 and resource == self.expire_resource:
                # this watch "expires": history is compacted
                self.expire_watches -= 1
                self.compacted = self.rv
                yield _gone(since)
                return
        while True:
            with self.cond:
                pending = [
                    (rv, t, o)
                    for rv, res, ons, t, o in self.events
                    if rv > since and res == resource and ons == ns and self._selected(o, query)
                ]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.stopping:
                        return
                    self.cond.wait(timeout=min(left, 0.2))
                    continue
            for rv, kind, obj in pending:
                since = rv
                yield {"type": kind, "object": _public(obj)}

    def _log(self, req: BaseHTTPRequestHandler, ns: str, name: str, query: dict[str, str]) -> None:
        pod = self.objects.get((PODS, ns, name))
        if pod is None:
            return _send(req, 404, _not_found(PODS, name))
        text = pod.get("logs", "")
        if query.get("previous") == "true":
            if "previous_logs" not in pod:
                container = query.get("container", "")
                message = f'previous terminated container "{container}" in pod "{name}" not found'
                return _send(req, 400, status_doc(400, "BadRequest", message))
            text = pod["previous_logs"]
        if query.get("tailLines"):
            lines = text.splitlines(keepends=True)
            text = "".join(lines[len(lines) - min(len(lines), int(query["tailLines"])) :])
        if query.get("follow") != "true":
            return _send(req, 200, text.encode(), "text/plain")
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        for line in text.splitlines(keepends=True):
            _chunk(req, line.encode())
            time.sleep(0.01)
        _chunk(req, b"")


# ---- scripted lifecycle steps --------------------------------------------------------------
def created() -> Callable[[FakeApiServer, str, str], None]:
    return lambda api, ns, name: api.set_condition(
        ns, name, "Created", "MPIJobCreated", f"MPIJob {ns}/{name} is created."
    )


def running(logs: str = "") -> Callable[[FakeApiServer, str, str], None]:
    def act(api: FakeApiServer, ns: str, name: str) -> None:
        api.add_pod(ns, f"{name}-launcher-x1", api.pod_labels(ns, name, "launcher"), logs=logs)
        api.set_condition(ns, name, "Running", "MPIJobRunning", f"MPIJob {ns}/{name} is running.")

    return act


def launcher_pod(
    suffix: str, logs: str = "", phase: str = "Running", previous_logs: str | None = None
) -> Callable[[FakeApiServer, str, str], None]:
    """One more launcher pod (another attempt of the launcher Job)."""
    return lambda api, ns, name: api.add_pod(
        ns,
        f"{name}-launcher-{suffix}",
        api.pod_labels(ns, name, "launcher"),
        logs=logs,
        phase=phase,
        previous_logs=previous_logs,
    )


def _pod_name(name: str, role: str) -> str:
    return f"{name}-worker-0" if role == "worker" else f"{name}-launcher-x1"


def _ensure_pod(api: FakeApiServer, ns: str, name: str, role: str) -> str:
    pod = _pod_name(name, role)
    if (PODS, ns, pod) not in api.objects:
        api.add_pod(ns, pod, api.pod_labels(ns, name, role), phase="Pending")
    return pod


def waiting(
    reason: str, message: str = "", role: str = "launcher"
) -> Callable[[FakeApiServer, str, str], None]:
    """The role's pod is Pending with its container waiting for ``reason``."""

    def act(api: FakeApiServer, ns: str, name: str) -> None:
        pod = _ensure_pod(api, ns, name, role)
        container = {
            "name": role,
            "ready": False,
            "restartCount": 0,
            "image": "registry.example/finetune-job:9.9",
            "imageID": "",
            "started": False,
            "state": {"waiting": {"reason": reason, "message": message}},
        }
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}
        api.set_pod_status(
            ns, pod, "Pending", conditions=[scheduled], containerStatuses=[container]
        )

    return act


def started(role: str = "launcher") -> Callable[[FakeApiServer, str, str], None]:
    """The role's pod runs: its container started."""

    def act(api: FakeApiServer, ns: str, name: str) -> None:
        pod = _ensure_pod(api, ns, name, role)
        container = {
            "name": role,
            "ready": True,
            "restartCount": 0,
            "image": "registry.example/finetune-job:9.9",
            "imageID": "registry.example/finetune-job@sha256:0",
            "started": True,
            "state": {"running": {"startedAt": now()}},
        }
        api.set_pod_status(ns, pod, "Running", containerStatuses=[container])

    return act


def unschedulable(message: str, role: str = "worker") -> Callable[[FakeApiServer, str, str], None]:
    """The scheduler finds no node for the role's pod."""

    def act(api: FakeApiServer, ns: str, name: str) -> None:
        pod = _ensure_pod(api, ns, name, role)
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": now(),
        }
        api.set_pod_status(ns, pod, "Pending", conditions=[cond])

    return act


def warning(
    kind: str, reason: str, message: str, suffix: str = ""
) -> Callable[[FakeApiServer, str, str], None]:
    """A Warning event about ``<job name><suffix>`` of ``kind`` (``{name}`` in the message)."""
    return lambda api, ns, name: api.add_event(
        ns, kind, name + suffix, reason, message.format(name=name, ns=ns)
    )


def succeeded() -> Callable[[FakeApiServer, str, str], None]:
    return lambda api, ns, name: api.set_condition(
        ns, name, "Succeeded", "MPIJobSucceeded", f"MPIJob {ns}/{name} successfully completed."
    )


def failed(message: str = "launcher exited 1") -> Callable[[FakeApiServer, str, str], None]:
    return lambda api, ns, name: api.set_condition(
        ns, name, "Failed", "BackoffLimitExceeded", message
    )


def kubeconfig(url: str, namespace: str = "team-a", token: str = TOKEN) -> str:
    """A kubeconfig (YAML text) whose current context points at ``url``."""
    return (
        f"apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters:\n- name: fake\n  cluster:\n    server: {url}\n"
        f"users:\n- name: tester\n  user:\n    token: {token}\n"
        f"contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n"
        f"    namespace: {namespace}\n"
    )


# ---- HTTP plumbing ---------------------------------------------------------------------------
def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("logs", "previous_logs")}


def _not_found(resource: str, name: str) -> dict[str, Any]:
    group = _GROUPS[resource][0]
    full = f"{resource}{'.' + group if group else ''}"
    return status_doc(404, "NotFound", f'{full} "{name}" not found')


def _gone(rv: int) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": status_doc(410, "Expired", f"too old resource version: {rv}"),
    }


def _send(
    req: BaseHTTPRequestHandler, code: int, body: Any, ctype: str = "application/json"
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req.send_response(code)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


def _chunk(req: BaseHTTPRequestHandler, data: bytes) -> None:
    req.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    req.wfile.flush()


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            api.handle(self, "GET")

        def do_POST(self) -> None:  # noqa: N802
            api.handle(self, "POST")

        def do_DELETE(self) -> None:  # noqa: N802
            api.handle(self, "DELETE")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler
