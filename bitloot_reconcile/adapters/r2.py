"""R2 key vault: store each delivered key once, read it back, presign downloads (botocore, no Dagster import).

Paths and download names are given by the caller: BitLoot's layout (`orders/{orderId}/key-{item8}.{ext}`) lives
in `domain.delivery`. Downloads are presigned GETs with `Content-Disposition: attachment`, 3 h by default,
capped at 7 days like BitLoot.

Never two different contents at one path: `put_key` is a conditional put (`If-None-Match: *`, honoured by R2,
S3 and SeaweedFS). When something is already there it reads it back: the same bytes mean an earlier attempt
got through (returns False, nothing written); different bytes raise `KeyConflictError` and nothing is
overwritten.

Error taxonomy (adapters/errors.py), service "r2":
- connection refused or reset, timeouts, 5xx, 429, SlowDown, a concurrent conditional write (409) -> TransientError
- NoSuchKey, 404 -> NotFoundError
- 401/403 (bad access key, bad signature, access denied), NoSuchBucket and any other 4xx -> PermanentError
  (kind = the S3 error code)

Messages say what failed in the words an alert shows: the service, the S3 operation and object path, then the
HTTP status and S3 error code, e.g. `r2: put_object orders/<id>/key-<item8>.txt: 503 ServiceUnavailable`. Never a
secret key, a presigned URL or an object's bytes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from bitloot_reconcile.adapters.errors import NotFoundError, PermanentError, TransientError

# botocore's DEBUG records print request signatures and string-to-sign (and so presigned-URL signatures);
# keep them out of every log, whatever level the host process runs at.
logging.getLogger("botocore").setLevel(logging.INFO)

SERVICE = "r2"
DEFAULT_BUCKET = "bitloot-keys"
DEFAULT_PRESIGN_SECONDS = 3 * 60 * 60          # every BitLoot fulfilment call site uses 3 h
MAX_PRESIGN_SECONDS = 7 * 24 * 60 * 60         # SigV4 limit; BitLoot's client caps at 7 days too

_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "TooManyRequests", "RequestLimitExceeded", "ConditionalRequestConflict", "OperationAborted",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9-]+$")
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

# One botocore session for the process: it caches the parsed S3 service model, so a client costs ~10 ms instead
# of ~200 ms. Sessions are not thread-safe, clients are: clients are created under a lock, then used freely.
_session_lock = threading.Lock()
_session: botocore.session.Session | None = None


class KeyConflictError(PermanentError):
    """A different object already sits at the key's path; it was left untouched."""


@dataclass(frozen=True)
class StoredObject:
    data: bytes = field(repr=False)   # a key serial or image: never in a repr or a log line
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"StoredObject(content_type={self.content_type!r}, size={len(self.data)})"


# ---------------------------------------------------------------------------------------------- pure helpers
def r2_endpoint(account_id: str) -> str:
    """The S3 endpoint of a Cloudflare account: `https://{account_id}.r2.cloudflarestorage.com`."""
    account_id = (account_id or "").strip()
    if not account_id or not _ACCOUNT_ID.match(account_id):
        raise ValueError("R2 account id must be a non-empty string of letters, digits and dashes")
    return f"https://{account_id}.r2.cloudflarestorage.com"


def resolve_endpoint(endpoint: str | None, account_id: str | None) -> str:
    """`R2_ENDPOINT` when set, else the endpoint derived from `R2_ACCOUNT_ID` (BitLoot's rule)."""
    endpoint = (endpoint or "").strip()
    if endpoint:
        return endpoint.rstrip("/")
    if not (account_id or "").strip():
        raise ValueError("set R2_ENDPOINT or R2_ACCOUNT_ID")
    return r2_endpoint(account_id or "")


def _safe_filename(filename: str) -> str:
    """Quote-, newline- and non-ASCII-free, so it cannot break out of the Content-Disposition header."""
    cleaned = _FILENAME_UNSAFE.sub("_", filename or "").strip("._")
    if not cleaned:
        raise ValueError("filename must contain at least one letter or digit")
    return cleaned[:200]


# ---------------------------------------------------------------------------------------------- the vault
class KeyVault:
    """Key objects in one R2 (or S3-compatible) bucket. Thread-safe: boto3 clients may be shared."""

    def __init__(self, endpoint_url: str, access_key_id: str, secret_access_key: str,
                 bucket: str = DEFAULT_BUCKET, *, region: str = "auto", connect_timeout: float = 5,
                 read_timeout: float = 15, max_attempts: int = 2,
                 presign_expiry_seconds: int = DEFAULT_PRESIGN_SECONDS):
        if not endpoint_url:
            raise ValueError("KeyVault needs an endpoint_url (R2_ENDPOINT or one derived from R2_ACCOUNT_ID)")
        if not access_key_id or not secret_access_key:
            raise ValueError("KeyVault needs an access key id and a secret access key")
        if not bucket:
            raise ValueError("KeyVault needs a bucket name")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive numbers of seconds")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.presign_expiry_seconds = _check_expiry(presign_expiry_seconds)
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=20,
            # Only send/verify the newer flexible checksums when an operation requires them: R2 and other
            # S3-compatible stores have lagged behind botocore's defaults here.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = self._make_client()

    def _make_client(self) -> Any:
        global _session
        with _session_lock:
            if _session is None:
                _session = botocore.session.get_session()
            return _session.create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret_access_key,
                region_name=self.region,
                config=self._config,
            )

    def __repr__(self) -> str:  # no credentials
        return f"KeyVault({self.endpoint_url!r}, bucket={self.bucket!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> KeyVault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ writes
    def put_key(self, path: str, data: bytes, content_type: str,
                metadata: Mapping[str, str] | None = None) -> bool:
        """Store `data` at `path` unless something is there already.

        True: created now. False: the same bytes were already stored (an earlier attempt got through).
        Raises KeyConflictError when different bytes are stored there (left untouched).
        """
        _check_path(path)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes")
        data = bytes(data)
        if not data:
            raise ValueError("refusing to store an empty key")
        if not content_type:
            raise ValueError("content_type must not be empty")
        params: dict[str, Any] = {
            "Bucket": self.bucket, "Key": path, "Body": data, "ContentType": content_type, "IfNoneMatch": "*",
        }
        if metadata:
            meta = {str(k): str(v) for k, v in metadata.items()}
            if not all(k.isascii() and v.isascii() and "\n" not in v and "\r" not in v for k, v in meta.items()):
                raise ValueError("object metadata must be single-line ASCII (it travels as x-amz-meta-* headers)")
            params["Metadata"] = meta
        try:
            self._client.put_object(**params)
            return True
        except ClientError as exc:
            if _code(exc) not in _PRECONDITION_CODES and _status(exc) != 412:
                raise _map_error(exc, "put_object", path) from exc
        except BotoCoreError as exc:
            raise _map_error(exc, "put_object", path) from exc
        # Something is already at `path`: identical bytes are success, anything else is a conflict.
        try:
            existing = self.read(path)
        except NotFoundError:
            # Deleted between our put and our read: let the caller retry the whole step.
            raise TransientError(SERVICE, f"put {path}: object vanished after a failed conditional put",
                                 kind="PreconditionFailed") from None
        if existing.data == data:
            return False
        raise KeyConflictError(SERVICE, f"put_object {path}: a different object is already stored at this path; "
                               "it was left untouched", status=412, kind="KeyConflict")

    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing. True when created now, False when it already existed.

        For the sandbox, the demo and tests: production R2 tokens scoped to objects cannot create buckets.
        """
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if _status(exc) != 404 and _code(exc) not in ("NoSuchBucket", "NotFound", "404"):
                raise _map_error(exc, "head_bucket", self.bucket) from exc
        except BotoCoreError as exc:
            raise _map_error(exc, "head_bucket", self.bucket) from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            if _code(exc) in _BUCKET_EXISTS_CODES:
                return False
            raise _map_error(exc, "create_bucket", self.bucket) from exc
        except BotoCoreError as exc:
            raise _map_error(exc, "create_bucket", self.bucket) from exc

    # ------------------------------------------------------------------------------------------ reads
    def read(self, path: str) -> StoredObject:
        """The object's bytes and content type. NotFoundError when nothing is stored at `path`."""
        _check_path(path)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=path)
            with resp["Body"] as body:
                data = body.read()
        except (ClientError, BotoCoreError) as exc:
            raise _map_error(exc, "get_object", path) from exc
        return StoredObject(
            data=data,
            content_type=resp.get("ContentType") or "application/octet-stream",
            metadata=dict(resp.get("Metadata") or {}),
        )

    def exists(self, path: str) -> bool:
        """Whether an object is stored at `path` (HEAD; a 404 is False, other failures raise)."""
        _check_path(path)
        try:
            self._client.head_object(Bucket=self.bucket, Key=path)
            return True
        except ClientError as exc:
            if _status(exc) == 404 and _code(exc) != "NoSuchBucket":
                return False
            raise _map_error(exc, "head_object", path) from exc
        except BotoCoreError as exc:
            raise _map_error(exc, "head_object", path) from exc

    def presign_get(self, path: str, *, expires_in: int | None = None, filename: str,
                    content_type: str | None = None) -> str:
        """A presigned GET for `path` that downloads as `filename` (attachment) with `content_type`.

        `expires_in` defaults to the vault's `presign_expiry_seconds` (3 h) and is capped at 7 days.
        Signing is local: no request is made, so this works (and a missing object shows) only on use.
        The URL is a bearer credential: store it where BitLoot does (`order_items.signedUrl`), never log it.
        """
        _check_path(path)
        seconds = self.presign_expiry_seconds if expires_in is None else expires_in
        seconds = min(_check_expiry(seconds, cap=False), MAX_PRESIGN_SECONDS)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": path,
            "ResponseContentDisposition": f'attachment; filename="{_safe_filename(filename)}"',
        }
        if content_type:
            params["ResponseContentType"] = content_type
        try:
            return self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)
        except (ClientError, BotoCoreError) as exc:
            raise _map_error(exc, "presign get_object", path) from exc

    # ------------------------------------------------------------------------------------------ reports
    def put_object(self, path: str, data: bytes, content_type: str) -> None:
        """Store `data` at `path`, replacing whatever is there: for reports only. Keys never go through
        here (they are written once, by `put_key`), so paths under `orders/` are refused."""
        _check_path(path)
        if path.startswith("orders/"):
            raise ValueError("put_object overwrites, so it never writes under orders/ (keys use put_key)")
        try:
            self._client.put_object(Bucket=self.bucket, Key=path, Body=bytes(data), ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise _map_error(exc, "put_object", path) from exc


# ---------------------------------------------------------------------------------------------- errors
def _check_path(path: str) -> None:
    if not path or not isinstance(path, str) or path.startswith("/"):
        raise ValueError("object path must be a non-empty relative key such as orders/<id>/key-<item>.txt")


def _check_expiry(seconds: int, *, cap: bool = True) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise ValueError("presign expiry must be a whole number of seconds, at least 1")
    if cap and seconds > MAX_PRESIGN_SECONDS:
        raise ValueError(f"presign expiry is capped at {MAX_PRESIGN_SECONDS} s (7 days)")
    return seconds


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _map_error(exc: Exception, operation: str, path: str) -> Exception:
    """Translate a botocore failure into the shared taxonomy, with a message free of secrets."""
    where = f"{operation} {path}"
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        answer = f"{where}: {status or 'no status'} {code or 'error'}"
        if code in _TRANSIENT_CODES or status == 429 or (status is not None and status >= 500):
            return TransientError(SERVICE, answer, status=status, kind=code or None)
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            return NotFoundError(SERVICE, f"{answer}: no such object", status=status, kind=code or None)
        if status in (401, 403):
            return PermanentError(SERVICE, f"{answer}: check R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY and the "
                                  "token's bucket permissions", status=status, kind=code or None)
        return PermanentError(SERVICE, answer, status=status, kind=code or None)
    kind = type(exc).__name__
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # Connection refused/reset, DNS, connect or read timeout, a body cut off mid-read.
        return TransientError(SERVICE, f"{where}: no answer, R2 unreachable or too slow ({kind})", kind=kind)
    return PermanentError(SERVICE, f"{where}: {kind}", kind=kind)
