"""The storage layer against S3 server processes (SeaweedFS, a real one; moto, a mock) and a local directory."""

from __future__ import annotations

import logging
import os
import subprocess
import time

import pytest

from trainer.config import S3Config
from trainer.errors import RetryableError, UserError
from trainer.storage import MULTIPART_THRESHOLD, open_store
from s3server import CREDENTIALS, S3Server, SlowDownProxy, free_port, weed_binary


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket("store")
    return s3_server


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)


def s3_store(endpoint: str, uri: str = "s3://store/some/prefix", retry_seconds: int = 0):
    return open_store(uri, S3Config(endpoint=endpoint, region="us-east-1", addressing_style="path",
                                    credentials_secret="", retry_seconds=retry_seconds))


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, aws_env, s3):
    if request.param == "file":
        return open_store((tmp_path / "root").as_uri())
    return s3_store(s3.endpoint)


def test_write_read_list_delete(store, tmp_path):
    store.write_bytes("exp/step-1/a.pt", b"alpha")
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(1000))
    store.write_file("exp/step-1/b.pt", source)
    assert store.read_bytes("exp/step-1/a.pt") == b"alpha"
    store.read_file("exp/step-1/b.pt", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert store.sizes("exp") == {"exp/step-1/a.pt": 5, "exp/step-1/b.pt": 1000}
    assert store.sizes("nothing-here") == {}
    store.delete(["exp/step-1/a.pt", "exp/step-1/b.pt"])
    assert store.sizes("exp") == {}


def test_multipart_object_roundtrips(s3, aws_env):
    store = s3_store(s3.endpoint)
    data = os.urandom(MULTIPART_THRESHOLD + 3 * 1024 * 1024)  # above the threshold: multipart upload
    store.write_bytes("big/blob", data)
    assert store.read_bytes("big/blob") == data
    assert s3.keys("store", "some/prefix/big/") == {"some/prefix/big/blob": len(data)}


def test_unreachable_endpoint_is_retryable_and_never_logs_credentials(aws_env, caplog):
    store = s3_store(f"http://127.0.0.1:{free_port()}", retry_seconds=2)
    caplog.set_level(logging.DEBUG, logger="trainer")
    with pytest.raises(RetryableError) as failure:
        store.write_bytes("x", b"1")
    assert failure.value.exit_code == 144 and "unreachable" in str(failure.value)
    assert "EndpointConnectionError); retry 1 in" in caplog.text
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in caplog.text + str(failure.value)


def test_throttling_and_5xx_are_waited_out_within_retry_seconds(s3, aws_env, caplog):
    """S3 answers 503 SlowDown for a while (a proxy in front of the real server): each operation
    retries with backoff and succeeds once the server answers, within s3.retrySeconds."""
    caplog.set_level(logging.WARNING, logger="trainer")
    proxy = SlowDownProxy(s3, fail_seconds=4)
    try:
        store = s3_store(proxy.endpoint, retry_seconds=60)
        store.write_bytes("throttled/a", b"written through 503s")
        assert proxy.refused >= 2, proxy.refused  # botocore does not retry here (AWS_MAX_ATTEMPTS=1): we did
        assert "failed (503 SlowDown); retry 1 in" in caplog.text
        assert store.read_bytes("throttled/a") == b"written through 503s"
        assert s3.keys("store", "some/prefix/throttled/") == {"some/prefix/throttled/a": 20}
    finally:
        proxy.close()


def test_a_server_that_keeps_failing_is_retryable_after_retry_seconds(s3, aws_env):
    proxy = SlowDownProxy(s3)  # 503 for ever
    try:
        store = s3_store(proxy.endpoint, retry_seconds=3)
        started = time.monotonic()
        with pytest.raises(RetryableError) as failure:
            store.sizes("anything")
        waited = time.monotonic() - started
    finally:
        proxy.close()
    assert failure.value.exit_code == 144
    assert "after 3s of retries (s3.retrySeconds; 503 SlowDown" in str(failure.value)
    assert waited >= 3 and proxy.refused >= 3, (waited, proxy.refused)
    assert waited < 60  # the budget bounds the wait, not a fixed count of long backoffs


def test_missing_bucket_and_missing_credentials_are_user_errors(s3, aws_env, monkeypatch):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        s3_store(s3.endpoint, "s3://no-such-bucket/x").sizes("p")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="AWS_SECRET_ACCESS_KEY"):
        s3_store(s3.endpoint)


@pytest.fixture
def small_disk(tmp_path):
    """A 128 MB tmpfs: a disk with little free space (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_the_seaweedfs_test_server_holds_many_buckets_on_a_small_disk(small_disk):
    """30 buckets, more than the suite makes, each written and read back: SeaweedFS' capacity does not
    depend on the free disk (with -volume.max=0 and 7 volumes grown per bucket, the second bucket's
    PutObject answered InternalError here)."""
    if not weed_binary():
        pytest.skip("SeaweedFS' weed is not built (KUBETRAIN_WEED)")
    server = S3Server(backend="seaweedfs", data_dir=small_disk / "data").start()
    try:
        client = server.client()
        for i in range(30):
            bucket = server.create_bucket(f"experiment-{i:02d}")
            client.put_object(Bucket=bucket, Key="step-1/model.pt", Body=b"%d" % i * 1000)
        for i in range(30):
            body = client.get_object(Bucket=f"experiment-{i:02d}", Key="step-1/model.pt")["Body"].read()
            assert body == b"%d" % i * 1000
    finally:
        server.stop()
