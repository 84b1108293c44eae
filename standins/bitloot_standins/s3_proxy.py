"""A pass-through HTTP proxy in front of the S3 stand-in that can fail chosen requests, to stage R2 outages.

Requests are forwarded unchanged, Host header included, so SigV4 signatures (made for the proxy's address)
still verify at SeaweedFS. An outage rule answers 503 `ServiceUnavailable` for requests whose path contains
a given text, a given number of times or for a window of time (`outage_window`). Other rules forward the
request (S3 stores the object) and then drop the connection unanswered ("lost") or answer 500 ("commit_500").
Observers (`observe`) are called after every answer with the method, path and status sent (None: dropped).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service is unavailable (staged outage)</Message></Error>"
)
INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
MODES = ("unavailable", "lost", "commit_500")


@dataclass
class Outage:
    path_contains: str
    times: int
    until: float | None = None  # a window (time.monotonic()): every matching request until then, `times` ignored
    mode: str = "unavailable"   # see MODES
    method: str | None = None   # only requests with this method (e.g. "PUT")

    def applies(self, method: str, path: str, now: float) -> bool:
        live = now < self.until if self.until is not None else self.times > 0
        return live and self.path_contains in path and self.method in (None, method)


class FaultyS3Proxy:
    def __init__(self, upstream_url: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = httpx.Client(base_url=upstream_url, timeout=30.0)
        self.outages: list[Outage] = []
        self.failed = 0
        self._observers: list[Callable[[str, str, int | None], None]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, path_contains: str, times: int, *, mode: str = "unavailable", method: str | None = None) -> Outage:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        outage = Outage(path_contains, times, mode=mode, method=method)
        with self._lock:
            self.outages.append(outage)
        return outage

    def outage_window(self, seconds: float, path_contains: str = "") -> Outage:
        """Answer 503 to every matching request for the next `seconds`."""
        outage = Outage(path_contains, 0, until=time.monotonic() + seconds)
        with self._lock:
            self.outages.append(outage)
        return outage

    def observe(self, callback: Callable[[str, str, int | None], None]) -> None:
        self._observers.append(callback)

    def _failure(self, method: str, path: str) -> str | None:
        """The mode of the first rule this request falls under (counting it), or None to forward it."""
        now = time.monotonic()
        with self._lock:
            for outage in self.outages:
                if outage.applies(method, path, now):
                    outage.times -= 1
                    self.failed += 1
                    return outage.mode
        return None

    def start(self) -> FaultyS3Proxy:
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.upstream.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _forward(self) -> None:
                status: int | None = None
                try:
                    status = self._answer()
                finally:
                    for callback in list(proxy._observers):
                        callback(self.command, self.path, status)

            def _answer(self) -> int | None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy._failure(self.command, self.path)
                if mode == "unavailable":
                    status, headers, content = 503, {"Content-Type": "application/xml"}, UNAVAILABLE
                else:
                    upstream = proxy.upstream.request(
                        self.command,
                        self.path,
                        content=body,
                        headers=[(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP],
                    )
                    status, content = upstream.status_code, upstream.content
                    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers.pop("content-length", None)
                if mode == "lost":  # S3 did the work; the client sees the connection die
                    self.close_connection = True
                    self.connection.close()
                    return None
                if mode == "commit_500":
                    status, headers, content = 500, {"Content-Type": "application/xml"}, INTERNAL_ERROR
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)
                return status

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
