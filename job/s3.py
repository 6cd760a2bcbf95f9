"""The S3 side of ``job.storage``: how to reach S3 (:class:`S3Settings`), the boto3 client
(botocore's own retries and timeouts), streamed GET bodies whose breaks are named, and the
one-line reading of S3's error codes."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from job.errors import StorageError, StreamError


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Empty ``endpoint_url``/``region``: boto3 decides (AWS_ENDPOINT_URL,
    AWS_REGION / AWS_DEFAULT_REGION, ~/.aws/config), as every AWS tool does."""

    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 5  # botocore attempts per request, the first one included
    retry_mode: str = "standard"  # standard | adaptive | legacy
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # Uploads at least this large go in parts of multipart_chunksize, max_concurrency at once.
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 8

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> S3Settings:
        """From the config keys ``s3_*`` (a Config's ``to_dict()``, or parsed flags)."""
        return cls(**{k[len("s3_") :]: v for k, v in values.items() if k.startswith("s3_")})


def stream_errors() -> tuple[type[BaseException], ...]:
    """What a streamed S3 body raises when the connection drops mid-read."""
    from http.client import IncompleteRead, RemoteDisconnected

    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeoutError

    return (
        ReadTimeoutError,
        ResponseStreamingError,
        IncompleteReadError,
        ConnectionClosedError,
        ProtocolError,
        Urllib3ReadTimeoutError,
        IncompleteRead,
        RemoteDisconnected,
        OSError,  # ConnectionResetError, TimeoutError, BrokenPipeError, ...
    )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in S3 URI")
    return bucket, key


def new_client(s: S3Settings) -> Any:
    """A boto3 S3 client; boto3 is imported here, so local-only runs never load it."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        retries={"total_max_attempts": s.max_attempts, "mode": s.retry_mode},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=s.endpoint_url or None, region_name=s.region or None, config=config
    )


def client_error(e: Any, uri: str) -> str:
    err = e.response.get("Error", {})
    code = str(err.get("Code", "?"))
    if code in ("NoSuchBucket",) or (code == "404" and e.operation_name == "HeadBucket"):
        return f"bucket '{split_s3(uri)[0]}' does not exist"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access denied ({code}): check the credentials and the bucket policy"
    return f"{code} {err.get('Message', '')}".strip()


class S3Stream:
    """An S3 GET body whose read errors become :class:`StreamError` naming URI and offset."""

    def __init__(self, uri: str, body: Any, start: int) -> None:
        self._uri, self._body, self._pos = uri, body, start
        self._errors = stream_errors()

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._body.read(None if n < 0 else n)
        except self._errors as e:
            raise StreamError(
                f"{self._uri}: read broke off at byte {self._pos}: {type(e).__name__}: {e}"
            ) from e
        self._pos += len(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(*self._errors):  # closing a broken connection may fail too
            self._body.close()

    def __enter__(self) -> S3Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
