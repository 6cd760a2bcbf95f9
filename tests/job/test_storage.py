"""The storage layer against a real S3 endpoint (moto's server over HTTP) and local disk."""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from job.storage import S3Settings, Storage, StorageError, is_s3, join, split_s3


@pytest.fixture
def s3(s3_server):
    return Storage(S3Settings(endpoint_url=s3_server))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a local folder and on an S3 prefix."""
    if request.param == "local":
        return Storage(), str(tmp_path / "root")
    s3 = Storage(S3Settings(endpoint_url=request.getfixturevalue("s3_server")))
    return s3, request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_exists_list_and_delete(root):
    storage, base = root
    uri = join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(join(base, "c.txt"), b"x")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert storage.size(uri) == 5
    assert storage.list(base) == [join(base, "a", "b.bin"), join(base, "c.txt")]
    storage.delete_prefix(base)
    assert storage.list(base) == []


def test_ranged_reads(root):
    storage, base = root
    uri = join(base, "data.bin")
    data = bytes(range(256)) * 64
    storage.write_bytes(uri, data)
    assert storage.read_range(uri, 1000, 1010) == data[1000:1010]
    with storage.open_read(uri, 16000) as fh:
        assert fh.read() == data[16000:]
    with storage.open_read(uri, 5, 9) as fh:
        assert fh.read(2) + fh.read() == data[5:9]


@pytest.mark.slow
def test_listing_follows_pagination_past_1000_keys(s3, s3_bucket, s3_client):
    bucket = s3_bucket[len("s3://") :]
    keys = [f"many/k{i:05d}" for i in range(1010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=bucket, Key=k, Body=b""), keys))
    s3_client.put_object(Bucket=bucket, Key="other/x", Body=b"")  # outside the prefix
    assert s3.list(f"{s3_bucket}/many") == [f"{s3_bucket}/{k}" for k in keys]
    s3.delete_prefix(f"{s3_bucket}/many")  # deletes in batches of 1000
    assert s3.list(f"{s3_bucket}/many") == [] and s3.exists(f"{s3_bucket}/other/x")


def test_large_uploads_go_in_parallel_parts(s3_server, s3_bucket, s3_client, tmp_path):
    storage = Storage(
        S3Settings(
            endpoint_url=s3_server,
            multipart_threshold=5 << 20,
            multipart_chunksize=5 << 20,
            max_concurrency=4,
        )
    )
    data = os.urandom(12 << 20)
    (tmp_path / "big").write_bytes(data)
    uri = f"{s3_bucket}/big.bin"
    storage.upload(str(tmp_path / "big"), uri)
    head = s3_client.head_object(Bucket=s3_bucket[5:], Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    storage.download(uri, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data


def test_open_write_streams_s3_parts_as_they_fill(s3_server, s3_bucket, s3_client):
    storage = Storage(S3Settings(endpoint_url=s3_server, multipart_chunksize=5 << 20))
    data = os.urandom(12 << 20)
    uri = f"{s3_bucket}/streamed.bin"
    with storage.open_write(uri) as fh:
        for i in range(0, len(data), 1 << 20):
            fh.write(data[i : i + (1 << 20)])
        assert not storage.exists(uri)  # nothing lands before the end
        uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket[5:])["Uploads"]
        parts = s3_client.list_parts(Bucket=s3_bucket[5:], Key="streamed.bin",
                                     UploadId=uploads[0]["UploadId"])["Parts"]  # fmt: skip
        assert len(parts) == 2  # 10 of the 12 MiB went up while writing
    head = s3_client.head_object(Bucket=s3_bucket[5:], Key="streamed.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert storage.read_bytes(uri) == data


def test_open_write_leaves_nothing_when_the_writer_fails(root):
    storage, base = root
    uri = join(base, "broken.bin")
    with pytest.raises(RuntimeError, match="stopped"), storage.open_write(uri) as fh:
        fh.write(os.urandom(6 << 20))
        raise RuntimeError("stopped")
    assert not storage.exists(uri)
    assert storage.list(base) == []  # no temp file either
    if is_s3(base):  # and no multipart upload left open (they cost storage until aborted)
        uploads = storage.client.list_multipart_uploads(Bucket=split_s3(base)[0])
        assert uploads.get("Uploads", []) == []


def test_endpoint_comes_from_aws_endpoint_url(s3_server, s3_bucket, monkeypatch):
    """boto3 reads the standard AWS_ENDPOINT_URL itself when no endpoint is configured."""
    Storage(S3Settings(endpoint_url=s3_server)).write_bytes(f"{s3_bucket}/k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage = Storage(S3Settings())
    assert storage.client.meta.endpoint_url == s3_server
    assert storage.read_bytes(f"{s3_bucket}/k") == b"v"


def test_retries_and_timeouts_are_configured():
    settings = S3Settings(
        endpoint_url="http://127.0.0.1:1",
        region="eu-west-1",
        max_attempts=7,
        retry_mode="adaptive",
        connect_timeout=1.5,
        read_timeout=3.0,
    )
    config = Storage(settings).client.meta.config
    assert config.retries == {"total_max_attempts": 7, "mode": "adaptive"}  # 1 + 6 retries
    assert (config.connect_timeout, config.read_timeout) == (1.5, 3.0)
    assert Storage(settings).client.meta.region_name == "eu-west-1"


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_read_timeout_fails_fast_with_the_uri(silent_server):
    storage = Storage(S3Settings(endpoint_url=silent_server, max_attempts=2, read_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^s3://b/k: HEAD failed: .*[Rr]ead timeout"):
        storage.exists("s3://b/k")
    assert time.monotonic() - started < 60  # bounded, not hanging; never a timing test


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_is_one_clear_error_within_seconds():
    storage = Storage(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^s3://b/ds/manifest.json: HEAD failed: S3 endpoint"):
        storage.exists("s3://b/ds/manifest.json")
    assert time.monotonic() - started < 120  # 5 attempts with backoff: bounded, not timed


def test_missing_bucket_is_named(s3):
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/ds: .*bucket 'no-such-bucket'"):
        s3.check_bucket("s3://no-such-bucket/ds")


def test_missing_credentials_are_named(s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage = Storage(S3Settings(endpoint_url=s3_server))
    with pytest.raises(StorageError, match=r"^s3://b/k: HEAD failed: no AWS credentials"):
        storage.exists("s3://b/k")


def test_local_errors_name_the_path(tmp_path):
    with pytest.raises(StorageError, match="nope.bin"):
        Storage().open_read(str(tmp_path / "nope.bin"))
