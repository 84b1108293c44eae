"""SeaweedS3: a real `weed mini` on loopback, signatures enforced, private ports and data, clean stop."""

from __future__ import annotations

import glob
import os
import socket
import stat
import threading

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from bitloot_standins.s3 import SeaweedS3, SeaweedStartError


def client_for(s3: SeaweedS3, secret: str | None = None):
    return boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=secret or s3.secret_access_key, region_name=s3.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"total_max_attempts": 1}),
    )


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_session_instance_checks_signatures(seaweed: SeaweedS3):
    assert seaweed.endpoint_url.startswith("http://127.0.0.1:")
    assert seaweed.region == "auto"
    assert seaweed.is_running() and seaweed.startup_seconds is not None
    assert seaweed.secret_access_key not in repr(seaweed)
    # anonymous requests are refused
    assert httpx.get(seaweed.endpoint_url + "/").status_code == 403
    # signed ones work; a wrong secret is refused
    client = client_for(seaweed)
    client.list_buckets()
    with pytest.raises(ClientError) as err:
        client_for(seaweed, secret="wrong").list_buckets()
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # R2 does not create buckets on upload, and neither does the stand-in
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket="never-created-bucket", Key="k", Body=b"x")
    assert err.value.response["Error"]["Code"] == "NoSuchBucket"
    assert seaweed.env()["R2_ENDPOINT"] == seaweed.endpoint_url


def test_parallel_instances_are_independent_and_stop_cleanly():
    instances = [SeaweedS3(), SeaweedS3()]
    errors: list[BaseException] = []

    def start(s3: SeaweedS3) -> None:
        try:
            s3.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s3,)) for s3 in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        a, b = instances
        assert a.endpoint_url != b.endpoint_url and a.data_dir != b.data_dir
        assert a.access_key_id != b.access_key_id
        ca, cb = client_for(a), client_for(b)
        ca.create_bucket(Bucket="only-in-a")
        ca.put_object(Bucket="only-in-a", Key="k", Body=b"a")
        assert [x["Name"] for x in cb.list_buckets()["Buckets"]] == []
        # each instance accepts only its own credentials
        with pytest.raises(ClientError):
            boto3.session.Session().client(
                "s3", endpoint_url=b.endpoint_url, aws_access_key_id=a.access_key_id,
                aws_secret_access_key=a.secret_access_key, region_name="auto",
                config=Config(signature_version="s3v4", retries={"total_max_attempts": 1}),
            ).list_buckets()

        pid, port, root = a.pid, a.s3_port, a.data_dir.parent
        assert pid is not None and root.is_dir()
        a.stop()
        assert not a.is_running()
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group is gone
        assert not port_open(port)
        assert not root.exists()
        assert not [p for p in glob.glob(f"/tmp/seaweedfs-*-{port}.sock")
                    if stat.S_ISSOCK(os.lstat(p).st_mode)]
        # the other instance is unaffected
        assert b.is_running() and cb.list_buckets()["Buckets"] == []
    finally:
        for s3 in instances:
            s3.stop()


def test_persistent_data_dir_survives_restart(tmp_path):
    data = tmp_path / "s3data"
    with SeaweedS3(data_dir=data, access_key_id="AKPERSIST", secret_access_key="persist-secret") as s3:
        client = client_for(s3)
        client.create_bucket(Bucket="kept")
        client.put_object(Bucket="kept", Key="k", Body=b"still here")
    s3 = SeaweedS3(data_dir=data, access_key_id="AKPERSIST", secret_access_key="persist-secret").start()
    try:
        assert client_for(s3).get_object(Bucket="kept", Key="k")["Body"].read() == b"still here"
    finally:
        s3.stop(grace=0)
    assert (data / "weed.log").exists() and data.is_dir()  # a caller's directory is kept


def test_start_failure_reports_log_tail(tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fatal: marker-4711 cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    s3 = SeaweedS3(weed_path=str(fake), start_timeout=5)
    with pytest.raises(SeaweedStartError) as err:
        s3.start()
    assert "code 3" in str(err.value) and "marker-4711" in str(err.value)
    assert s3.pid is None and not s3.is_running()


def test_start_timeout_is_bounded(tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'waiting forever marker-0815'\nexec sleep 30\n")
    fake.chmod(0o755)
    s3 = SeaweedS3(weed_path=str(fake), start_timeout=0.5)
    with pytest.raises(SeaweedStartError) as err:
        s3.start()
    assert "within 0.5 s" in str(err.value) and "marker-0815" in str(err.value)
    assert not s3.is_running()


def test_stop_is_idempotent_and_not_started_is_clear():
    s3 = SeaweedS3()
    s3.stop()
    with pytest.raises(RuntimeError):
        _ = s3.endpoint_url
