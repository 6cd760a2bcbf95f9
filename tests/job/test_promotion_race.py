"""Compare-and-swap promotion: two runs finishing together cannot both pass the gate on
the same old ``latest`` and leave the worse one promoted. On the moto S3 server, which
honours conditional writes (If-Match / If-None-Match: *), and on a local folder."""

from __future__ import annotations

import json
import threading

import pytest

from job import layout
from job.errors import GateError
from job.outputs import registry
from job.storage import S3Settings, Storage


class Interleaved(Storage):
    """Storage on which every gate's first read of ``latest`` waits until both gates have
    read it: the race of two runs that finish at the same moment, made certain."""

    def __init__(self, s3: S3Settings | None, barrier: threading.Barrier) -> None:
        super().__init__(s3)
        self.barrier, self.first = barrier, True

    def read_versioned(self, uri):
        got = super().read_versioned(uri)
        if self.first and uri.endswith("/latest"):
            self.first = False
            self.barrier.wait(timeout=30)
        return got


class Unconditional(Interleaved):
    """The same, but the write ignores the condition: a plain PUT, as before."""

    def put_if(self, uri, data, version):
        self.write_bytes(uri, data)
        return True


def write_summary(storage: Storage, root: str, run: str, val_top1: float) -> None:
    uri = layout.summary(layout.run_folder(root, run))
    storage.write_bytes(uri, json.dumps({"val_top1": val_top1}).encode())


def race(kind: type[Interleaved], settings: S3Settings | None, root: str, first_latest: bool):
    """Runs a (0.9) and b (0.8) finish together under a not-worse gate; the second to write
    is b. Returns (outcome per run, the final latest pointer)."""
    plain = Storage(settings)
    write_summary(plain, root, "a", 0.9)
    write_summary(plain, root, "b", 0.8)
    if first_latest:
        write_summary(plain, root, "old", 0.5)
        registry.finish_run(plain, root, "old", registry.Gate())
    barrier = threading.Barrier(2)
    a_done = threading.Event()
    outcome: dict[str, str] = {}

    def finish(run: str) -> None:
        storage = kind(settings, barrier)
        if run == "b":  # b writes second: it read latest as early as a, but is slower
            original = storage.put_if

            def after_a(uri, data, version):
                a_done.wait(timeout=30)
                return original(uri, data, version)

            storage.put_if = after_a  # type: ignore[method-assign]
        try:
            registry.finish_run(storage, root, run, registry.Gate(not_worse=True))
            outcome[run] = "promoted"
        except GateError as e:
            outcome[run] = str(e)
        finally:
            if run == "a":
                a_done.set()

    threads = [threading.Thread(target=finish, args=(run,)) for run in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcome, json.loads(plain.read_bytes(registry.join(root, "latest")))


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path):
    if request.param == "local":
        return None, str(tmp_path / "root")
    settings = S3Settings(endpoint_url=request.getfixturevalue("s3_server"))
    return settings, request.getfixturevalue("s3_bucket") + "/root"


@pytest.mark.parametrize("first_latest", [False, True], ids=["first-promotion", "replacing"])
def test_the_worse_of_two_racing_runs_is_judged_again_and_not_promoted(where, first_latest):
    settings, root = where
    outcome, latest = race(Interleaved, settings, root, first_latest)
    assert outcome["a"] == "promoted"
    assert "worse than latest's 0.9000" in outcome["b"]
    assert latest["run"] == "a"


@pytest.mark.parametrize("first_latest", [False, True], ids=["first-promotion", "replacing"])
def test_without_the_condition_the_worse_run_wins_the_race(where, first_latest):
    """The race above is real: with a plain PUT both runs pass and b overwrites a."""
    settings, root = where
    outcome, latest = race(Unconditional, settings, root, first_latest)
    assert outcome == {"a": "promoted", "b": "promoted"}
    assert latest["run"] == "b"


def test_a_put_if_on_a_stale_version_is_refused_by_the_s3_server(s3_server, s3_bucket):
    storage = Storage(S3Settings(endpoint_url=s3_server))
    uri = f"{s3_bucket}/latest"
    assert storage.put_if(uri, b"1", None)
    assert not storage.put_if(uri, b"2", None)  # If-None-Match: * once it exists
    data, version = storage.read_versioned(uri)
    assert data == b"1"
    assert storage.put_if(uri, b"3", version)
    assert not storage.put_if(uri, b"4", version)  # If-Match on the ETag of "1"
    assert storage.read_bytes(uri) == b"3"
