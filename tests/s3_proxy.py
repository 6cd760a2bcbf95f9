"""An HTTP proxy in front of a real S3 endpoint (moto's server), for what moto cannot do by
itself: limit the bandwidth of uploads to that of one shared link (a slow object store, for
the checkpoint benchmark; parallel parts of a multipart upload share it)
and refuse writes to some keys with S3's own 403 AccessDenied (a bucket policy or a quota,
switched on while a run is going). Every other request and every byte is passed through.

    with S3Proxy(moto_url, upload_bytes_per_second=20e6) as proxy:
        proxy.url  # the endpoint to give boto3
        proxy.refuse = re.compile(r"/checkpoints/step-")  # PUT/POST to those keys: 403
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 64 * 1024
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class S3Proxy:
    def __init__(self, upstream: str, upload_bytes_per_second: float = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.rate = upload_bytes_per_second  # 0: no limit
        self.refuse: re.Pattern[str] | None = None
        self.refused = 0
        self._link = threading.Lock()
        self._link_free_at = 0.0  # when the upload link has sent what it was given
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> S3Proxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reserve(self, size: int) -> float:
        """Seconds until ``size`` more bytes have crossed the shared upload link."""
        with self._link:
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + size / self.rate
            return self._link_free_at - now

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                length = str(len(body))
                for key, value in headers:
                    if key.lower() == "content-length" and self.command == "HEAD":
                        length = value  # the object's size, with no body
                    elif key.lower() not in HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                writes = self.command in ("PUT", "POST")
                if writes and proxy.refuse is not None and proxy.refuse.search(self.path):
                    proxy.refused += 1
                    self._send(403, [("Content-Type", "application/xml")], DENIED)
                    return
                if writes and proxy.rate > 0:  # the upload takes as long as the link would
                    time.sleep(proxy.reserve(len(body)))
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=120
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self._send(response.status, response.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        return Handler
