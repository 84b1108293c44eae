"""A small threaded JSON HTTP server that the simulators build on.

Each simulator registers routes (method, path regex, handler name). The base records every request for
tests to inspect and applies injected faults per route before the handler runs: added latency, canned
error responses (5xx, 429 with Retry-After), "lost responses" where the handler runs (so the side
effect happens) but the connection is dropped before any byte of the answer is sent, and "committed errors"
where the handler runs but the client gets the canned error. Observers (`observe`) see every request when
it arrives and after it was answered, e.g. to kill the client at that moment in a chaos run.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    route: str | None
    status: int | None = None


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """One injected fault for a route, applied to the next `times` matching requests."""

    times: int = 1
    status: int | None = None          # answer with this status instead of running the handler
    body: Any = None
    retry_after: float | None = None   # Retry-After header on the canned answer
    latency: float = 0.0               # seconds to sleep before answering (applied even without status)
    lose_response: bool = False        # run the handler, then drop the connection without answering
    match: Callable[[Any], bool] | None = None  # only requests whose parsed body satisfies this
    commit: bool = False               # with `status`: run the handler first, then answer the canned error
    where: Callable[[RecordedRequest], bool] | None = None  # only requests (path, query, body...) satisfying this


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (timeout, injected latency) closes its socket before we answer: expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class JsonServer:
    """Base for the simulators. Subclasses call `route()` in `__init__` and implement handlers."""

    name = "sandbox"

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._routes: list[tuple[str, re.Pattern[str], str, Callable[..., Response]]] = []
        self._faults: dict[str, list[Fault]] = {}
        self._observers: list[Callable[[RecordedRequest, str], None]] = []
        self._lock = threading.RLock()
        self.requests: list[RecordedRequest] = []
        self._httpd = _QuietServer((host, port), self._make_handler())
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        # serve_forever's default 0.5 s poll would make every stop() wait up to half a second; tests start one
        # simulator per test, so poll faster.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name=f"{self.name}-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------------------------------------
    def route(self, method: str, pattern: str, name: str, handler: Callable[..., Response]) -> None:
        self._routes.append((method, re.compile(f"^{pattern}$"), name, handler))

    def inject(self, route: str, fault: Fault) -> None:
        """Queue a fault for the named route; faults apply in the order they were injected."""
        with self._lock:
            self._faults.setdefault(route, []).append(fault)

    def observe(self, callback: Callable[[RecordedRequest, str], None]) -> None:
        """Call `callback(request, phase)` from the serving thread: phase "received" once the route is known
        (before faults and the handler), "answered" after the answer was sent or the connection dropped."""
        self._observers.append(callback)

    def _notify(self, record: RecordedRequest, phase: str) -> None:
        for callback in list(self._observers):
            callback(record, phase)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests_to(self, route: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.route == route]

    def _next_fault(self, route: str, record: RecordedRequest) -> Fault | None:
        with self._lock:
            queue = self._faults.get(route) or []
            fault = next((f for f in queue if (f.match is None or f.match(record.body))
                          and (f.where is None or f.where(record))), None)
            if fault is None:
                return None
            fault.times -= 1
            if fault.times <= 0:
                queue.remove(fault)
            return fault

    # -- hooks for subclasses ----------------------------------------------------------------------------
    def authorize(self, headers: dict[str, str]) -> Response | None:
        """Return an error response when the request is not authorised, else None."""
        return None

    def not_found(self, method: str, path: str) -> Response:
        return Response(404, {"error": "not found", "path": path, "method": method})

    def canned_error(self, status: int, method: str, path: str) -> Any:
        return {"error": "injected fault", "status": status}

    # -- plumbing ----------------------------------------------------------------------------------------
    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes,
                  record: RecordedRequest) -> tuple[Response | None, bool]:
        """Returns (response, lose_response)."""
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        record.path, record.query = path, query
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", "replace")
        record.body = body
        for route_method, pattern, name, handler in self._routes:
            match = pattern.match(path)
            if route_method != method or not match:
                continue
            record.route = name
            denied = self.authorize(headers)
            if denied is not None:
                return denied, False
            self._notify(record, "received")
            fault = self._next_fault(name, record)
            if fault and fault.latency:
                time.sleep(fault.latency)
            if fault and fault.status is not None and fault.commit:
                with self._lock:
                    handler(body=body, query=query, headers=headers, **match.groupdict())
            if fault and fault.status is not None:
                extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                body_out = fault.body if fault.body is not None else self.canned_error(fault.status, method, path)
                return Response(fault.status, body_out, extra), False
            with self._lock:
                response = handler(body=body, query=query, headers=headers, **match.groupdict())
            return response, bool(fault and fault.lose_response)
        return self.not_found(method, path), False

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw_body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                record = RecordedRequest(self.command, self.path, {}, headers, None, None)
                with server._lock:
                    server.requests.append(record)
                response, lose = server._dispatch(self.command, self.path, headers, raw_body, record)
                try:
                    self._answer(record, response, lose)
                finally:
                    if record.route:
                        server._notify(record, "answered")

            def _answer(self, record: RecordedRequest, response: Response | None, lose: bool) -> None:
                if lose or response is None:
                    # The side effect happened; the client sees the connection die with no answer.
                    self.close_connection = True
                    self.connection.close()
                    return
                record.status = response.status
                payload = b"" if response.body is None else json.dumps(response.body).encode()
                self.send_response(response.status)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in response.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        return Handler
