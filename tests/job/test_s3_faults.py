"""A flaky network, corrupt shards and bad S3 settings, against moto's S3 server over HTTP.

A TCP proxy between the job and the server cuts connections mid-shard; shards with bad
frames, a truncated tail and an undecodable image are read from S3; and the command run
with a wrong bucket, a missing prefix, no credentials or an unreachable endpoint must stop
at once with one line naming the URI.
"""

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from job.errors import DataError
from job.input import data as data_mod
from job.input.data import DataStats, Loader, LoaderSettings, Piece, ShardReader, load_dataset
from job.input.records import read_index
from job.storage import S3Settings, Storage
from job.training import lifecycle


class CuttingProxy:
    """TCP proxy on 127.0.0.1 to ``upstream``: every connection is cut (alternately a FIN
    and a RST) once ``cut_after`` bytes of response went through it; with ``refuse`` set,
    new connections are closed at once."""

    def __init__(self, upstream: str, cut_after: int | None = None) -> None:
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.cut_after, self.refuse, self.cuts = cut_after, False, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()

    def _accept(self) -> None:
        self.server.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            if self.refuse:
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions in one thread (select), so a cut closes the sockets for real."""
        sent, limit = 0, self.cut_after
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                if client in ready:
                    if not (chunk := client.recv(65536)):
                        return
                    upstream.sendall(chunk)
                if upstream in ready:
                    if not (chunk := upstream.recv(65536)):
                        return
                    if limit is not None and sent + len(chunk) > limit:
                        client.sendall(chunk[: limit - sent])
                        self.cuts += 1
                        if self.cuts % 2:  # RST: the reader sees ConnectionResetError
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        return
                    client.sendall(chunk)
                    sent += len(chunk)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


@pytest.fixture
def proxy(s3_server):
    p = CuttingProxy(s3_server)
    yield p
    p.close()


@pytest.fixture
def s3_tiny(tiny_dataset, s3_upload, s3_bucket):
    root = f"{s3_bucket}/ds"
    s3_upload(tiny_dataset, root)
    return root


def all_batches(root, storage, train_mode, strict=False):
    """Every batch of the train split, read by one rank; (data, labels, stats)."""
    stats = DataStats()
    settings = LoaderSettings(batch_size=8, image_size=32, workers=2, strict_data=strict)
    ds = load_dataset(root, storage)
    loader = Loader(ds, "train", settings, 0, 1, storage, stats, train=train_mode)
    try:
        batches = list(loader.epoch(1))
    finally:
        loader.close()
    data = np.concatenate([b.data[: b.valid] for b in batches])
    labels = np.concatenate([b.label[: b.valid] for b in batches])
    return data, labels, stats


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_cut_connections_lose_and_repeat_no_record(
    train_mode, tiny_dataset, s3_tiny, proxy, monkeypatch
):
    monkeypatch.setattr(data_mod._Attempts, "BACKOFF_S", 0.01)
    want_data, want_labels, _ = all_batches(tiny_dataset, Storage(), train_mode)
    proxy.cut_after = 9000  # shards are ~40 kB: each one breaks off several times
    flaky = Storage(S3Settings(endpoint_url=proxy.endpoint, read_timeout=5))
    got_data, got_labels, stats = all_batches(s3_tiny, flaky, train_mode)
    assert proxy.cuts >= 8 and stats.read_retries >= 8
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_data, want_data)  # same records, same order, once each
    if not train_mode:
        assert len(got_labels) == 96
    assert stats.corrupt_records == stats.checksum_mismatches == stats.read_errors == 0


def test_a_connection_that_stays_down_is_a_data_error_naming_shard_and_byte(
    s3_tiny, proxy, monkeypatch
):
    monkeypatch.setattr(data_mod._Attempts, "BACKOFF_S", 0.01)
    storage = Storage(S3Settings(endpoint_url=proxy.endpoint, max_attempts=1, read_timeout=5))
    shard = load_dataset(s3_tiny, storage).splits["train"][0]
    proxy.cut_after = 5000
    stats = DataStats()
    stream = ShardReader(storage, stats, retries=2).stream([Piece(shard, 0, shard.count)])
    first = next(stream)  # the first records arrive; then the link goes down for good
    proxy.refuse = True
    with pytest.raises(DataError, match=r"train/part-00000.rec: read failed at byte \d+ after 2"):
        list(stream)
    assert first[1].offset == 0 and stats.read_errors == 1 and stats.read_retries >= 3


def corrupt_copy(tiny_dataset, dest):
    """The dataset with shard 0's record 3 unframed, shard 1 cut 10 bytes into record 20
    and shard 2's record 7 holding bytes that are no image; the manifest keeps its digests."""
    shutil.copytree(tiny_dataset, dest)
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    shards = manifest["splits"]["train"]["shards"]

    def load(i):
        path = os.path.join(dest, shards[i]["rec"])
        offsets = read_index(open(os.path.join(dest, shards[i]["idx"])).read())
        return path, bytearray(open(path, "rb").read()), offsets

    path, data, offsets = load(0)
    data[offsets[3] : offsets[3] + 4] = b"\0\0\0\0"
    open(path, "wb").write(data)
    path, data, offsets = load(1)
    open(path, "wb").write(data[: offsets[20] + 10])
    # A shard cut short inside its last records, with a manifest that agrees on its size (a
    # size the manifest does not know is refused before reading: test_immutable_dataset).
    shards[1]["bytes"] = offsets[20] + 10
    json.dump(manifest, open(os.path.join(dest, "manifest.json"), "w"))
    path, data, offsets = load(2)
    image_at = offsets[7] + 8 + 24  # frame header, then the IRHeader, then the JPEG
    length = struct.unpack_from("<I", data, offsets[7] + 4)[0] - 24
    data[image_at : image_at + length] = b"\0" * length
    open(path, "wb").write(data)
    return [s["rec"] for s in shards[:3]]


@pytest.fixture
def s3_corrupt(tiny_dataset, s3_upload, s3_bucket, tmp_path):
    bad = corrupt_copy(tiny_dataset, str(tmp_path / "corrupt"))
    root = f"{s3_bucket}/corrupt"
    s3_upload(str(tmp_path / "corrupt"), root)
    return root, bad


def test_corrupt_records_and_a_truncated_shard_are_skipped_counted_and_logged(
    s3_corrupt, s3_server, caplog
):
    root, bad = s3_corrupt
    storage = Storage(S3Settings(endpoint_url=s3_server))
    _, labels, stats = all_batches(root, storage, train_mode=False)
    assert len(labels) == 96 - 1 - 5 - 1  # bad frame, truncated tail of 5, undecodable image
    assert stats.corrupt_records == 7
    assert stats.checksum_mismatches == 3
    log = caplog.text
    for rec in bad:  # one corruption line and one checksum line per shard
        assert log.count(f"corrupt data in {root}/{rec}") == 1
        assert log.count(f"{root}/{rec}: sha256") == 1
    assert "part-00000.rec at byte" in log and "bad magic" in log
    assert "image does not decode" in log and "truncated" in log


def test_strict_data_stops_at_the_first_shard_whose_sha256_differs(s3_corrupt, s3_server):
    root, _ = s3_corrupt
    storage = Storage(S3Settings(endpoint_url=s3_server))
    with pytest.raises(DataError, match=r"corrupt/train/part-0000[0-2].rec: sha256 .*strict-data"):
        all_batches(root, storage, train_mode=False, strict=True)


@pytest.mark.slow
def test_training_on_corrupt_shards_finishes_and_reports_the_count(
    s3_corrupt, s3_server, s3_bucket, make_config
):
    root, _ = s3_corrupt
    summary = lifecycle.run(make_config(root, f"{s3_bucket}/run", s3_endpoint_url=s3_server))
    # Every epoch reads the 7 bad records again (the short share is even read twice to fill
    # the epoch's last batches); they are 7 records of the dataset, counted once per job.
    assert summary["corrupt_records"] == 7 and len(summary["history"]) == 2
    assert "once per job" in summary["corrupt_records_counts"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD_STARTS = {
    "wrong-bucket": (
        {},
        "s3://no-such-bucket/ds",
        r"s3://no-such-bucket/ds/manifest.json: .*bucket 'no-such-bucket' does not exist",
    ),
    "missing-prefix": (
        {},
        "s3://{bucket}/no-dataset-here",
        r"s3://.*/no-dataset-here/manifest.json: no dataset manifest",
    ),
    "no-credentials": (
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        "s3://{bucket}/ds",
        r"s3://.*/ds/manifest.json: HEAD failed: no AWS credentials",
    ),
    "unreachable-endpoint": (
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"},
        "s3://{bucket}/ds",
        r"s3://.*/ds/manifest.json: HEAD failed: S3 endpoint unreachable: .*127.0.0.1:\d+",
    ),
}


@pytest.fixture(scope="module")
def bad_starts(s3_env, s3_client, launch_env, tmp_path_factory):
    """`finetune-job train` for every case of BAD_STARTS, run side by side."""
    s3_client.create_bucket(Bucket="bad-starts")
    out = str(tmp_path_factory.mktemp("out"))
    home = str(tmp_path_factory.mktemp("home"))  # no ~/.aws to fall back on
    procs = {}
    for case, (env_changes, data, _) in BAD_STARTS.items():
        env = dict(launch_env, **s3_env, HOME=home)
        for var, value in env_changes.items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value.format(port=free_port())
        data = data.format(bucket="bad-starts")
        cmd = ["finetune-job", "train", "--data", data, "--output", out, "--metrics-port", "0"]
        started = time.monotonic()
        procs[case] = (subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), started)
    results = {}
    for case, (proc, started) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        results[case] = (proc.returncode, stderr, time.monotonic() - started)
    return results


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_s3_settings_stop_at_start_with_one_line_naming_the_uri(case, bad_starts):
    code, stderr, seconds = bad_starts[case]
    errors = [line for line in stderr.splitlines() if line.startswith("finetune-job: error:")]
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert __import__("re").search(BAD_STARTS[case][2], errors[0]), errors[0]
    assert seconds < 60
