"""KeyVault against a real SeaweedFS S3 endpoint (signatures, expiry and If-None-Match enforced), no mocks."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config

from bitloot_reconcile.adapters.errors import (
    ExternalServiceError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from bitloot_reconcile.adapters.r2 import (
    MAX_PRESIGN_SECONDS,
    KeyConflictError,
    KeyVault,
    StoredObject,
    r2_endpoint,
    resolve_endpoint,
)
from bitloot_reconcile.domain.delivery import attachment_filename, key_object_path
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_standins.s3 import SeaweedS3
from bitloot_standins.s3_proxy import FaultyS3Proxy
from tests.fixtures.s3 import unique_bucket

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"
ITEM_ID = "a1b2c3d4-0000-4000-8000-000000000001"
TEXT_KEY = b"ABCDE-FGHIJ-KLMNO"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"IEND\xaeB`\x82"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(reversed(range(256))) * 3 + b"\xff\xd9"
GIF = b"GIF89a" + bytes(range(0, 256, 3)) + b"\x00;"


def raw_client(s3: SeaweedS3):
    return boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key, region_name=s3.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def object_keys(s3: SeaweedS3, bucket: str) -> list[str]:
    client = raw_client(s3)
    try:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        client.close()


def vault_for(s3: SeaweedS3, bucket: str, **kwargs) -> KeyVault:
    kwargs.setdefault("connect_timeout", 1)
    kwargs.setdefault("read_timeout", 2)
    return KeyVault(s3.endpoint_url, s3.access_key_id, kwargs.pop("secret", s3.secret_access_key), bucket,
                    region=s3.region, **kwargs)


# ------------------------------------------------------------------------------------------ pure helpers
def test_endpoint_from_account_id():
    assert r2_endpoint("0123abcd") == "https://0123abcd.r2.cloudflarestorage.com"
    assert resolve_endpoint("", "0123abcd") == "https://0123abcd.r2.cloudflarestorage.com"
    assert resolve_endpoint("http://127.0.0.1:9000/", "0123abcd") == "http://127.0.0.1:9000"
    with pytest.raises(ValueError):
        resolve_endpoint("", "")
    with pytest.raises(ValueError):
        r2_endpoint("evil.com/x?")


def test_resource_builds_vault_and_hides_secret():
    res = R2Resource(account_id="0123abcd", access_key_id="ak", secret_access_key="sk-very-secret")
    vault = res.get_vault()
    assert vault.endpoint_url == "https://0123abcd.r2.cloudflarestorage.com"
    assert vault.bucket == "bitloot-keys" and vault.presign_expiry_seconds == 10800
    assert res.get_vault() is vault
    assert "sk-very-secret" not in repr(res) and "sk-very-secret" not in repr(vault)


# ------------------------------------------------------------------------------------------ store and read
def test_put_read_exists_text_key(key_vault: KeyVault):
    path = key_object_path(ORDER_ID, ITEM_ID, "text/plain")
    assert not key_vault.exists(path)
    meta = {"order-id": ORDER_ID, "order-item-id": ITEM_ID, "kinguin-product-id": "5c9b68662539a4e8f17ae2fe"}
    assert key_vault.put_key(path, TEXT_KEY, "text/plain", meta) is True
    assert key_vault.exists(path)
    stored = key_vault.read(path)
    assert stored == StoredObject(TEXT_KEY, "text/plain", meta)
    assert "ABCDE" not in repr(stored)


@pytest.mark.parametrize("content_type,data", [("image/png", PNG), ("image/jpeg", JPEG), ("image/gif", GIF)])
def test_put_read_binary_image_keys(key_vault: KeyVault, content_type: str, data: bytes):
    path = key_object_path(ORDER_ID, ITEM_ID, content_type)
    assert key_vault.put_key(path, data, content_type) is True
    stored = key_vault.read(path)
    assert stored.data == data and stored.content_type == content_type


def test_read_missing_is_not_found(key_vault: KeyVault):
    with pytest.raises(NotFoundError) as err:
        key_vault.read("orders/nope/key-00000000.txt")
    assert err.value.status == 404
    assert key_vault.exists("orders/nope/key-00000000.txt") is False


def test_put_rejects_empty_key_and_bad_metadata(key_vault: KeyVault):
    with pytest.raises(ValueError):
        key_vault.put_key("orders/x/key-1.txt", b"", "text/plain")
    with pytest.raises(ValueError):
        key_vault.put_key("orders/x/key-1.txt", b"k", "text/plain", {"original-filename": "schlüssel.txt"})
    assert not key_vault.exists("orders/x/key-1.txt")


def test_missing_bucket_is_permanent(seaweed: SeaweedS3):
    vault = vault_for(seaweed, unique_bucket("missing"))
    with pytest.raises(PermanentError) as err:
        vault.put_key("orders/x/key-1.txt", b"k", "text/plain")
    assert err.value.kind == "NoSuchBucket"


def test_ensure_bucket_is_idempotent(seaweed: SeaweedS3):
    bucket = unique_bucket("ensure")
    vault = vault_for(seaweed, bucket)
    assert vault.ensure_bucket() is True
    assert vault.ensure_bucket() is False
    assert vault.put_key("orders/x/key-1.txt", b"k", "text/plain") is True


# ------------------------------------------------------------------------------------------ conditional put
def test_identical_second_put_is_a_no_op(seaweed: SeaweedS3, key_vault: KeyVault):
    path = key_object_path(ORDER_ID, ITEM_ID, "image/png")
    assert key_vault.put_key(path, PNG, "image/png") is True
    assert key_vault.put_key(path, PNG, "image/png") is False
    assert object_keys(seaweed, key_vault.bucket) == [path]
    assert key_vault.read(path).data == PNG


def test_different_content_conflicts_and_original_stays(key_vault: KeyVault):
    path = key_object_path(ORDER_ID, ITEM_ID, "text/plain")
    assert key_vault.put_key(path, TEXT_KEY, "text/plain", {"order-id": ORDER_ID}) is True
    with pytest.raises(KeyConflictError) as err:
        key_vault.put_key(path, b"ZZZZZ-YYYYY-XXXXX", "text/plain", {"order-id": "other"})
    assert isinstance(err.value, PermanentError)
    assert "ZZZZZ" not in str(err.value) and "ABCDE" not in str(err.value)
    assert key_vault.read(path) == StoredObject(TEXT_KEY, "text/plain", {"order-id": ORDER_ID})


def _race(vault: KeyVault, path: str, payloads: list[bytes]) -> list[object]:
    results: list[object] = [None] * len(payloads)
    barrier = threading.Barrier(len(payloads))

    def put(i: int) -> None:
        barrier.wait()
        try:
            results[i] = vault.put_key(path, payloads[i], "text/plain")
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            results[i] = exc

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_puts_at_one_path_exactly_one_wins(seaweed: SeaweedS3, key_vault: KeyVault):
    # Two writers carry the same bytes, two carry other bytes: one write lands, the same bytes count as
    # already stored, every other content is refused. SeaweedFS makes contending conditional writers of one
    # key wait in steps of about 1 s, so the rounds stay small.
    for round_ in range(2):
        path = f"orders/race-{round_}/key-00000000.txt"
        same = f"KEY-{round_}-same".encode()
        payloads = [same, f"KEY-{round_}-b".encode(), same, f"KEY-{round_}-c".encode()]
        results = _race(key_vault, path, payloads)
        winners = [i for i, r in enumerate(results) if r is True]
        assert len(winners) == 1, results
        stored = payloads[winners[0]]
        for i, r in enumerate(results):
            if i == winners[0]:
                continue
            if payloads[i] == stored:
                assert r is False, (i, results)
            else:
                assert isinstance(r, KeyConflictError), (i, results)
        assert key_vault.read(path).data == stored
    assert len(object_keys(seaweed, key_vault.bucket)) == 2


# ------------------------------------------------------------------------------------------ presigned URLs
def test_presigned_download(key_vault: KeyVault):
    path = key_object_path(ORDER_ID, ITEM_ID, "image/png")
    key_vault.put_key(path, PNG, "image/png")
    name = attachment_filename(ORDER_ID, ITEM_ID, "image/png")
    url = key_vault.presign_get(path, filename=name, content_type="image/png")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["10800"]
    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.content == PNG
    assert resp.headers["content-disposition"] == f'attachment; filename="{name}"'
    assert resp.headers["content-type"] == "image/png"


def test_presign_expiry_defaults_caps_and_validates(key_vault: KeyVault):
    def expires(url: str) -> int:
        return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])

    path = "orders/x/key-1.txt"
    assert expires(key_vault.presign_get(path, filename="f.txt")) == 10800
    assert expires(key_vault.presign_get(path, filename="f.txt", expires_in=60)) == 60
    assert expires(key_vault.presign_get(path, filename="f.txt", expires_in=30 * 86400)) == MAX_PRESIGN_SECONDS
    with pytest.raises(ValueError):
        key_vault.presign_get(path, filename="f.txt", expires_in=0)
    # a hostile filename cannot break out of the Content-Disposition header
    url = key_vault.presign_get(path, filename='a"\r\nX-Evil: 1.txt')
    disposition = parse_qs(urlsplit(url).query)["response-content-disposition"][0]
    assert disposition == 'attachment; filename="a___X-Evil__1.txt"'


def test_presigned_url_expires(key_vault: KeyVault):
    path = "orders/x/key-1.txt"
    key_vault.put_key(path, TEXT_KEY, "text/plain")
    url = key_vault.presign_get(path, filename="k.txt", expires_in=2)
    assert httpx.get(url).status_code == 200  # valid for at least 1 s more (X-Amz-Date is whole seconds)
    signed = datetime.strptime(parse_qs(urlsplit(url).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    valid_until = signed.replace(tzinfo=UTC).timestamp() + 2
    time.sleep(max(0.0, valid_until + 0.4 - time.time()))  # same host clock as the server
    resp = httpx.get(url)
    assert resp.status_code == 403
    assert "AccessDenied" in resp.text and TEXT_KEY not in resp.content


def test_tampered_presigned_urls_are_refused(key_vault: KeyVault):
    path = "orders/x/key-1.txt"
    key_vault.put_key(path, TEXT_KEY, "text/plain")
    url = key_vault.presign_get(path, filename="k.txt", content_type="text/plain")
    assert httpx.get(url).status_code == 200

    sig = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = ("0" if sig[-1] != "0" else "1")
    bad_sig = url.replace(f"X-Amz-Signature={sig}", f"X-Amz-Signature={sig[:-1]}{flipped}")
    assert bad_sig != url
    resp = httpx.get(bad_sig)
    assert resp.status_code == 403 and "SignatureDoesNotMatch" in resp.text

    # the download name is part of what is signed
    renamed = url.replace("k.txt", "x.txt")
    assert renamed != url and httpx.get(renamed).status_code == 403
    # so is the object: the same signature does not open a neighbour
    key_vault.put_key("orders/x/key-2.txt", b"OTHER", "text/plain")
    assert httpx.get(url.replace("key-1.txt", "key-2.txt")).status_code == 403
    # and an unsigned request gets nothing
    assert httpx.get(f"{key_vault.endpoint_url}/{key_vault.bucket}/{path}").status_code == 403


# ------------------------------------------------------------------------------------------ failures
def test_wrong_secret_key_is_permanent(seaweed: SeaweedS3, key_vault: KeyVault):
    key_vault.put_key("orders/x/key-1.txt", TEXT_KEY, "text/plain")
    bad = vault_for(seaweed, key_vault.bucket, secret="not-the-secret-key-at-all")
    for call in (lambda: bad.read("orders/x/key-1.txt"),
                 lambda: bad.put_key("orders/x/key-2.txt", b"k", "text/plain"),
                 lambda: bad.exists("orders/x/key-1.txt")):
        with pytest.raises(PermanentError) as err:
            call()
        assert err.value.status == 403
        assert "not-the-secret-key-at-all" not in str(err.value)
    assert not key_vault.exists("orders/x/key-2.txt")

    with pytest.raises(PermanentError) as err:
        bad.read("orders/x/key-1.txt")
    assert str(err.value).startswith("r2: get_object orders/x/key-1.txt: 403 "), err.value

    unknown = KeyVault(seaweed.endpoint_url, "AKIAUNKNOWN", seaweed.secret_access_key, key_vault.bucket,
                       region=seaweed.region)
    with pytest.raises(PermanentError) as err:
        unknown.read("orders/x/key-1.txt")
    assert err.value.status == 403


@pytest.fixture
def private_seaweed() -> Iterator[SeaweedS3]:
    with SeaweedS3() as s3:
        yield s3


def test_server_down_is_transient(private_seaweed: SeaweedS3):
    bucket = unique_bucket("down")
    vault = vault_for(private_seaweed, bucket)
    vault.ensure_bucket()
    assert vault.put_key("orders/x/key-1.txt", TEXT_KEY, "text/plain") is True
    private_seaweed.stop(grace=0)  # crash: connections are refused from now on

    for call in (lambda: vault.read("orders/x/key-1.txt"),
                 lambda: vault.put_key("orders/x/key-2.txt", b"k", "text/plain"),
                 lambda: vault.exists("orders/x/key-1.txt"),
                 vault.ensure_bucket):
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            call()
        assert "no answer, R2 unreachable or too slow" in str(err.value)
        # bounded by connect_timeout x attempts plus retry backoff, never a hang
        assert time.monotonic() - started < 10


def test_an_outage_says_service_operation_path_and_status(seaweed: SeaweedS3, key_vault: KeyVault):
    proxy = FaultyS3Proxy(seaweed.endpoint_url).start()
    try:
        vault = KeyVault(proxy.url, seaweed.access_key_id, seaweed.secret_access_key, key_vault.bucket,
                         region=seaweed.region, max_attempts=1)
        proxy.fail("orders/x/", times=2)
        with pytest.raises(TransientError) as err:
            vault.put_key("orders/x/key-1.txt", TEXT_KEY, "text/plain")
        assert str(err.value) == "r2: put_object orders/x/key-1.txt: 503 ServiceUnavailable"
        with pytest.raises(TransientError) as err:
            vault.read("orders/x/key-1.txt")
        assert str(err.value) == "r2: get_object orders/x/key-1.txt: 503 ServiceUnavailable"
        assert (err.value.service, err.value.status, err.value.kind) == ("r2", 503, "ServiceUnavailable")
    finally:
        proxy.stop()


def test_unresponsive_server_times_out_as_transient():
    # A listening socket that never answers: the TCP handshake completes, the request is never read.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        vault = KeyVault(f"http://127.0.0.1:{port}", "ak", "sk", "bucket", connect_timeout=0.5,
                         read_timeout=0.5, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            vault.read("orders/x/key-1.txt")
        assert err.value.kind == "ReadTimeoutError"
        assert time.monotonic() - started < 10


def test_errors_never_show_secrets_signatures_or_keys(seaweed: SeaweedS3, key_vault: KeyVault):
    secret_text = b"SECRET-SERIAL-123"
    path = "orders/x/key-1.txt"
    key_vault.put_key(path, secret_text, "text/plain")
    url = key_vault.presign_get(path, filename="k.txt")
    errors: list[ExternalServiceError] = []

    def collect(call):
        try:
            call()
        except ExternalServiceError as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an error")

    wrong_secret = "wrong-" + seaweed.secret_access_key
    bad = vault_for(seaweed, key_vault.bucket, secret=wrong_secret)
    collect(lambda: bad.read(path))
    collect(lambda: bad.put_key(path, secret_text, "text/plain"))
    collect(lambda: bad.exists(path))
    collect(lambda: bad.ensure_bucket())
    collect(lambda: key_vault.put_key(path, b"OTHER-SERIAL-456", "text/plain"))
    collect(lambda: key_vault.read("orders/x/missing.txt"))
    collect(lambda: vault_for(seaweed, unique_bucket("gone")).put_key(path, secret_text, "text/plain"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    down = KeyVault(f"http://127.0.0.1:{closed_port}", seaweed.access_key_id, wrong_secret, "b-x-y",
                    connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
    collect(lambda: down.read(path))
    collect(lambda: down.put_key(path, secret_text, "text/plain"))

    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    assert len(errors) == 9
    for exc in errors:
        text = f"{exc} {exc!r} {exc.args}"
        for needle in (seaweed.secret_access_key, wrong_secret, "X-Amz-Signature", signature,
                       "SECRET-SERIAL", "OTHER-SERIAL", url):
            assert needle not in text, (type(exc).__name__, needle)


def test_resource_vault_talks_to_seaweed(seaweed: SeaweedS3):
    bucket = unique_bucket("res")
    res = R2Resource(endpoint=seaweed.endpoint_url, access_key_id=seaweed.access_key_id,
                     secret_access_key=seaweed.secret_access_key, bucket=bucket, presign_expiry_seconds=600)
    vault = res.get_vault()
    vault.ensure_bucket()
    vault.put_key("orders/x/key-1.txt", TEXT_KEY, "text/plain")
    url = vault.presign_get("orders/x/key-1.txt", filename="k.txt")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["600"]
    assert httpx.get(url).content == TEXT_KEY


def test_no_aws_environment_leaks_into_vault(monkeypatch, seaweed: SeaweedS3, key_vault: KeyVault):
    # A developer's own AWS settings must not redirect or re-sign the vault's requests.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOTHER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert os.environ["AWS_ENDPOINT_URL"]
    vault = vault_for(seaweed, key_vault.bucket)
    assert vault.put_key("orders/x/key-9.txt", TEXT_KEY, "text/plain") is True
