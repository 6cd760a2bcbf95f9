"""One small storage layer for local paths and ``s3://`` URIs.

Every input and output of the job goes through :class:`Storage`, so each feature works on
both. S3 access (``job.s3``) uses boto3 with botocore's own retries and timeouts; the
endpoint, region and credentials come from the settings or the standard AWS chain
(environment, profile, web identity), so AWS, MinIO, Ceph and test servers all work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from job import s3
from job.errors import StorageError, StreamError
from job.s3 import S3Settings, is_s3, split_s3


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


class Storage:
    def __init__(self, s3: S3Settings | None = None) -> None:
        self.s3_settings = s3 or S3Settings()
        self._client: Any = None

    # S3 client, created on first use so local-only runs never touch boto3.
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3.new_client(self.s3_settings)
        return self._client

    @contextlib.contextmanager
    def _errors(self, uri: str, action: str) -> Iterator[None]:
        """botocore failures → one StorageError line naming the URI and what went wrong."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            yield
        except ClientError as e:
            raise StorageError(f"{uri}: {action} failed: {s3.client_error(e, uri)}") from e
        except S3UploadFailedError as e:  # boto3's transfer manager wraps the ClientError
            cause = e.__context__
            why = s3.client_error(cause, uri) if isinstance(cause, ClientError) else str(e)
            raise StorageError(f"{uri}: {action} failed: {why}") from e
        except NoCredentialsError as e:
            raise StorageError(
                f"{uri}: {action} failed: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web identity token)"
            ) from e
        except EndpointConnectionError as e:
            raise StorageError(f"{uri}: {action} failed: S3 endpoint unreachable: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"{uri}: {action} failed: {e}") from e

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return os.path.exists(uri)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with self._errors(uri, "HEAD"):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return True

    def check_bucket(self, uri: str) -> None:
        """Raise a StorageError naming ``uri`` unless its bucket exists and can be reached
        (a HEAD of a missing key cannot tell a missing bucket from a missing object)."""
        if not is_s3(uri):
            return
        bucket, _ = split_s3(uri)
        with self._errors(uri, "HEAD bucket"):
            self.client.head_bucket(Bucket=bucket)

    def size(self, uri: str) -> int:
        if not is_s3(uri):
            try:
                return os.path.getsize(uri)
            except OSError as e:
                raise StorageError(f"{uri}: {e.strerror or e}") from e
        bucket, key = split_s3(uri)
        with self._errors(uri, "HEAD"):
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def open_read(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        """A binary stream of bytes ``[start, end)``; S3 streams with one (ranged) GET."""
        if not is_s3(uri):
            try:
                fh = open(uri, "rb")  # noqa: SIM115 - the caller closes it
            except OSError as e:
                raise StorageError(f"{uri}: {e.strerror}") from e
            fh.seek(start)
            return fh if end is None else _Limited(fh, end - start)  # type: ignore[return-value]
        bucket, key = split_s3(uri)
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with self._errors(uri, "GET"):
            body = self.client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        return s3.S3Stream(uri, body, start)  # type: ignore[return-value]

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``uri`` (one ranged GET on S3)."""
        with self.open_read(uri, start, end) as fh:
            return fh.read()

    def read_bytes(self, uri: str) -> bytes:
        """The whole object; a stream that breaks off is resumed where it stopped."""
        data = bytearray()
        failures = 0
        while True:
            try:
                with self.open_read(uri, len(data)) as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                        data += chunk
                return bytes(data)
            except StreamError:
                failures += 1
                if failures >= self.s3_settings.max_attempts:
                    raise

    def write_bytes(self, uri: str, data: bytes, durable: bool = False) -> None:
        """Write ``uri`` whole, in one step. ``durable``: a local file and its folder entry
        are on disk (fsynced) when this returns; an S3 PUT always is."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._errors(uri, "PUT"):
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        with self._atomic_local(uri) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
        if durable:
            _fsync_dir(os.path.dirname(os.path.abspath(uri)))

    def read_versioned(self, uri: str) -> tuple[bytes | None, str | None]:
        """(content, version tag) of ``uri``, or (None, None) when it does not exist: the
        tag to give :meth:`put_if`. On S3 the tag is the ETag of the very bytes returned."""
        if not is_s3(uri):
            try:
                with open(uri, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                return None, None
            except OSError as e:
                raise StorageError(f"{uri}: {e.strerror}") from e
            return data, hashlib.sha256(data).hexdigest()
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with self._errors(uri, "GET"):
            try:
                got = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None, None
                raise
            return got["Body"].read(), str(got["ETag"])

    def put_if(self, uri: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap: write ``uri`` only if it is still at ``version`` (a tag from
        :meth:`read_versioned`; None: only if it does not exist yet). False when someone
        else wrote it in between: re-read and decide again.

        S3 conditional writes: ``If-Match: <ETag>``, or ``If-None-Match: *`` for the first;
        412 (or 409, a concurrent conditional write) is the lost race. Local files: the
        same under an exclusive lock on ``<uri>.lock``."""
        if not is_s3(uri):
            return self._put_if_local(uri, data, version)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        with self._errors(uri, "conditional PUT"):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = e.response.get("Error", {}).get("Code")
                if status in (409, 412) or code in (
                    "PreconditionFailed",
                    "ConditionalRequestConflict",
                ):
                    return False
                raise
        return True

    def _put_if_local(self, uri: str, data: bytes, version: str | None) -> bool:
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        try:
            with open(uri + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                if self.read_versioned(uri)[1] != version:
                    return False
                self.write_bytes(uri, data, durable=True)
        except OSError as e:
            raise StorageError(f"{uri}: conditional write failed: {e.strerror}") from e
        return True

    def probe_writable(self, folder: str) -> None:
        """Prove that ``folder`` takes writes: write a small probe object, then delete it.
        A StorageError names the folder and what failed."""
        import secrets

        probe = join(folder, f".finetune-write-probe-{secrets.token_hex(4)}")
        try:
            self.write_bytes(probe, b"probe\n")
            self.delete(probe)
        except StorageError as e:
            cause = e.__cause__  # a local write's OSError: its reason says it all
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else e
            raise StorageError(f"output {folder} is not writable: {why}") from e
        except OSError as e:
            raise StorageError(f"output {folder} is not writable: {e.strerror or e}") from e

    def sync(self, folder: str) -> None:
        """Make a local folder durable: every file below it, then the folders, then its
        parent's entry for it (a rename or create is durable only once its folder is).
        Nothing to do on S3, whose PUT returns once the object is stored."""
        if is_s3(folder):
            return
        try:
            for root, _, files in os.walk(folder, topdown=False):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                _fsync_dir(root)
            _fsync_dir(os.path.dirname(os.path.abspath(folder)))
        except OSError as e:
            raise StorageError(f"{folder}: fsync failed: {e.strerror}") from e

    def upload(self, local_path: str, uri: str) -> None:
        """Copy a local file to ``uri`` (multipart and parallel for large S3 objects)."""
        if is_s3(uri):
            from boto3.s3.transfer import TransferConfig

            bucket, key = split_s3(uri)
            s = self.s3_settings
            with self._errors(uri, "upload"):
                self.client.upload_file(
                    local_path,
                    bucket,
                    key,
                    Config=TransferConfig(
                        multipart_threshold=s.multipart_threshold,
                        multipart_chunksize=s.multipart_chunksize,
                        max_concurrency=s.max_concurrency,
                    ),
                )
            return
        with self._atomic_local(uri) as tmp:
            shutil.copyfile(local_path, tmp)

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary stream that lands at ``uri`` in one step when the block ends without an
        error, and leaves nothing there otherwise. On S3 it is a streamed multipart upload
        (smart_open): parts of ``multipart_chunksize`` go up as they fill, so memory holds
        one part, never the object; an error aborts the upload."""
        if not is_s3(uri):
            with self._atomic_local(uri) as tmp, open(tmp, "wb") as fh:
                yield fh
            return
        import smart_open.s3

        bucket, key = split_s3(uri)
        part_size = max(self.s3_settings.multipart_chunksize, smart_open.s3.MIN_PART_SIZE)
        with self._errors(uri, "multipart upload"):
            try:
                writer = smart_open.s3.open(
                    bucket, key, "wb", min_part_size=part_size, client=self.client
                )
            except ValueError as e:  # smart_open's form of a refused CreateMultipartUpload
                raise StorageError(f"{uri}: multipart upload failed: {e}") from e
            with writer:
                yield writer  # type: ignore[misc]

    def download(self, uri: str, local_path: str) -> None:
        if not is_s3(uri):
            try:
                shutil.copyfile(uri, local_path)
            except OSError as e:
                raise StorageError(f"{uri}: {e.strerror}") from e
            return
        bucket, key = split_s3(uri)
        with self._errors(uri, "download"):
            self.client.download_file(bucket, key, local_path)

    def list(self, prefix: str) -> list[str]:
        """Every object (file) below ``prefix``, as full URIs, sorted; follows pagination."""
        if not is_s3(prefix):
            found = []
            for root, _, files in os.walk(prefix):
                found += [os.path.join(root, f) for f in files]
            return sorted(found)
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        uris = []
        with self._errors(prefix, "LIST"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key
            ):
                uris += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(uris)

    def delete(self, uri: str) -> None:
        """Delete one object or file (gone already is fine)."""
        if not is_s3(uri):
            with contextlib.suppress(FileNotFoundError):
                os.remove(uri)
            return
        bucket, key = split_s3(uri)
        with self._errors(uri, "DELETE"):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        if not is_s3(prefix):
            shutil.rmtree(prefix, ignore_errors=True)
            return
        bucket, _ = split_s3(prefix)
        keys = [split_s3(u)[1] for u in self.list(prefix)]
        with self._errors(prefix, "DELETE"):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )

    @contextlib.contextmanager
    def local_copy(self, uri: str) -> Iterator[str]:
        """A local path holding ``uri``'s bytes (the file itself when it is local)."""
        if not is_s3(uri):
            if not os.path.exists(uri):
                raise StorageError(f"{uri}: no such file")
            yield uri
            return
        with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
            path = os.path.join(tmp, os.path.basename(uri) or "object")
            self.download(uri, path)
            yield path

    @contextlib.contextmanager
    def staged(self, uri: str) -> Iterator[str]:
        """A local path to write; on success it lands at ``uri`` in one step."""
        with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
            path = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "object")
            yield path
            self.upload(path, uri)

    @staticmethod
    @contextlib.contextmanager
    def _atomic_local(path: str) -> Iterator[str]:
        """A temporary name beside ``path`` that becomes ``path`` when the block ends; a
        failed write (no space, quota, permission) is a one-line StorageError naming
        ``path`` and leaves nothing behind."""
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            yield tmp
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"{path}: write failed: {e.strerror or e}") from e
        finally:
            with contextlib.suppress(OSError):  # gone, or it never could be made
                os.remove(tmp)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Limited:
    """A local file read up to a byte limit, like an S3 ranged GET."""

    def __init__(self, fh: IO[bytes], limit: int) -> None:
        self._fh, self._left = fh, limit

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
