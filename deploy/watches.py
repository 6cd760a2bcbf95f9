"""Several Kubernetes watches, one queue: a wait that reacts to the MPIJob and its pods.

The ``kubernetes`` watch is a blocking iterator, one per request, so each watched resource
gets a thread. Every thread lists once (a ``RELIST`` item carries the whole list), then
watches from the list's ``resourceVersion``, resumes from the last version it saw when the
server closes the request, and lists again when the server says that version is gone (410).
A watch that was connected once rides out an API server that goes away (a restart, a
failover): it tries again with back-off for up to ``RECONNECT_SECONDS``, then resumes (or
relists). The waiting thread reads the queue with a timeout, so it wakes up for its own
deadlines too.
``close()`` stops each watch by shutting its socket down, so no thread outlives the wait by
more than one request timeout.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("finetune_job.deploy")

# Longest single watch request; the thread re-watches (from the last resourceVersion) until
# it is stopped. Well under the API server's own --min-request-timeout (30 min by default).
WATCH_CHUNK_SECONDS = 300
RELIST = "RELIST"
ERROR = "ERROR"
# How long a watch that was connected keeps trying to reach a server that went away, and its
# back-off between tries. A server that cannot be reached at the first list fails at once.
RECONNECT_SECONDS = 120.0
RECONNECT_BACKOFF = (0.5, 1.0, 2.0, 4.0)
# What a restarting API server answers before it is ready.
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)


class RawWatch(k8s_watch.Watch):
    """Events as the server sent them (dicts): no model validation, so a field a server
    leaves out or adds cannot break the wait."""

    def get_return_type(self, func: Callable[..., Any]) -> Any:
        return None


@dataclass(frozen=True)
class Item:
    """One thing a watch saw: ``type`` is ADDED/MODIFIED/DELETED, RELIST or ERROR."""

    source: str
    type: str
    obj: Any  # the object (a dict); RELIST: the list of items; ERROR: the exception


class Feed:
    """Watch threads that put :class:`Item` s into one queue; use as a context manager."""

    def __init__(self, request_timeout: float) -> None:
        self.request_timeout = request_timeout
        self.items: queue.Queue[Item] = queue.Queue()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.watchers: dict[str, RawWatch] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch(self, source: str, list_fn: Callable[..., Any], *args: Any, **selectors: Any) -> None:
        """Start one thread: list, then watch ``list_fn(*args, **selectors)``."""
        thread = threading.Thread(
            target=self._run,
            args=(source, list_fn, args, selectors),
            name=f"watch-{source}",
            daemon=True,  # a stuck request never keeps the process alive
        )
        self.threads.append(thread)
        thread.start()

    def get(self, timeout: float) -> Item | None:
        try:
            return self.items.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        self.stopping.set()
        deadline = time.monotonic() + self.request_timeout
        for thread in self.threads:
            while thread.is_alive() and time.monotonic() < deadline:
                # Again and again: a watch whose response has not arrived yet cannot be
                # stopped (its socket is not known), and it forgets an earlier stop().
                with self.lock:
                    for watcher in self.watchers.values():
                        watcher.stop()  # shuts the socket down: a blocked read returns now
                thread.join(timeout=0.05)

    # ---- one thread ------------------------------------------------------------------------
    def _run(
        self, source: str, list_fn: Callable[..., Any], args: tuple[Any, ...], selectors: Any
    ) -> None:
        rv = ""
        connected = False
        lost: list[float] = []  # when each try since the server went away failed
        while not self.stopping.is_set():
            try:
                if not rv:
                    rv = self._list(source, list_fn, args, selectors)
                    connected, lost = True, []
                rv = self._watch_once(source, list_fn, args, selectors, rv)
                lost = []  # the server answered: a later outage gets its own allowance
            except ApiException as e:
                if e.status == 410:
                    log.info("watch of %s expired (410 Gone); relisting", source)
                    rv = ""
                    continue
                if not (connected and e.status in TRANSIENT_STATUSES and self._retry(lost)):
                    self._error(source, e)
                    return
            except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as e:
                if self.stopping.is_set():
                    return
                log.debug("watch of %s ended early (%s); resuming", source, e)
            except urllib3.exceptions.HTTPError as e:  # no connection: refused, reset, DNS
                if not (connected and self._retry(lost)):
                    self._error(source, e)
                    return
                log.info("watch of %s: API server unreachable (%s); trying again", source, e)
            except Exception as e:  # handed to the waiting thread, which decides
                self._error(source, e)
                return

    def _retry(self, lost: list[float]) -> bool:
        """Wait before the next try; False once the server has been away too long."""
        now = time.monotonic()
        if lost and now - lost[0] > RECONNECT_SECONDS:
            return False
        lost.append(now)
        delay = RECONNECT_BACKOFF[min(len(lost), len(RECONNECT_BACKOFF)) - 1]
        return not self.stopping.wait(delay)

    def _list(
        self, source: str, list_fn: Callable[..., Any], args: tuple[Any, ...], selectors: Any
    ) -> str:
        # Raw JSON: the same dicts as the watch events, whatever the resource's model class.
        resp = list_fn(
            *args, **selectors, _preload_content=False, _request_timeout=self.request_timeout
        )
        doc = json.loads(resp.data)
        self._put(Item(source, RELIST, list(doc.get("items") or [])))
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_once(
        self,
        source: str,
        list_fn: Callable[..., Any],
        args: tuple[Any, ...],
        selectors: Any,
        rv: str,
    ) -> str:
        """One watch request; returns the last resourceVersion seen."""
        watcher = RawWatch()
        with self.lock:
            if self.stopping.is_set():
                return rv
            self.watchers[source] = watcher
        try:
            for event in watcher.stream(
                list_fn,
                *args,
                **selectors,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_CHUNK_SECONDS,
                _request_timeout=(self.request_timeout, WATCH_CHUNK_SECONDS + self.request_timeout),
            ):
                obj = event["raw_object"]
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if event["type"] != "BOOKMARK":
                    self._put(Item(source, event["type"], obj))
                if self.stopping.is_set():
                    break
        finally:
            watcher.stop()
        return rv

    def _put(self, item: Item) -> None:
        if not self.stopping.is_set():
            self.items.put(item)

    def _error(self, source: str, e: Exception) -> None:
        if not self.stopping.is_set():
            self.items.put(Item(source, ERROR, e))
