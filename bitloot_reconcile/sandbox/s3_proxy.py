"""A pass-through HTTP proxy in front of the S3 stand-in that can fail chosen requests, to stage R2 outages.

Requests are forwarded unchanged, Host header included, so SigV4 signatures (made for the proxy's address)
still verify at SeaweedFS. An outage rule answers 503 `ServiceUnavailable` for requests whose path contains
a given text, a given number of times.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service is unavailable (staged outage)</Message></Error>"
)


@dataclass
class Outage:
    path_contains: str
    times: int


class FaultyS3Proxy:
    def __init__(self, upstream_url: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = httpx.Client(base_url=upstream_url, timeout=30.0)
        self.outages: list[Outage] = []
        self.failed = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, path_contains: str, times: int) -> None:
        with self._lock:
            self.outages.append(Outage(path_contains, times))

    def _should_fail(self, path: str) -> bool:
        with self._lock:
            for outage in self.outages:
                if outage.times > 0 and outage.path_contains in path:
                    outage.times -= 1
                    self.failed += 1
                    return True
        return False

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
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._should_fail(self.path):
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
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
