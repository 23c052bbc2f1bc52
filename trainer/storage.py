"""Object storage for checkpoints and weights: `file://` and `s3://` URIs.

One small interface, `Store`, over a local directory or an S3-compatible
bucket reached through boto3. Keys are '/'-separated paths below the URI.

S3 settings come from the `s3` values section (endpoint, region, addressing
style); credentials only from the standard AWS environment variables, which the
chart fills from `s3.credentialsSecret` — never from values, never logged.
Every request gets botocore's few quick standard-mode retries (AWS_MAX_ATTEMPTS
overrides the attempt count) and connect/read timeouts; large objects go through
s3transfer multipart with a TransferConfig tuned by benchmarks/storage_throughput.py.
On top, each operation waits out an outage: 5xx answers (InternalError, SlowDown,
which S3 returns as a matter of course), throttling and connection errors are
retried with exponential backoff and jitter for `s3.retrySeconds`, because each
exit costs a whole restart and rendezvous. A store still failing then raises
RetryableError (exit 144) so the operator restarts the pod; bad buckets and
credentials are UserErrors. SIGTERM (stop_waiting()) ends the waiting at once:
the grace period belongs to the checkpoint, and Ctrl-C on `kubetrain run` must
stop a run that waits for a dead endpoint.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar
from urllib.parse import unquote, urlparse

from trainer.errors import EXIT_PREEMPTED, EXIT_STORAGE_UNAVAILABLE, RetryableError, UserError
from trainer.values_model import S3Config

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
# Multipart: 16 MiB parts keep a 1 GB object at 64 parts; 16 threads hide per-request latency.
MULTIPART_THRESHOLD = 16 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
MAX_CONCURRENCY = 16
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 120
# botocore attempts per request, standard mode: its sleeps (at most 1 s, then 2 s) stay short, so the
# time-bounded wait below decides how long an outage is waited out, and notices SIGTERM between tries.
DEFAULT_MAX_ATTEMPTS = 3
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 8.0
# Answers worth waiting out besides any 5xx: S3's throttling and timeouts.
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                             "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})

_stopped = False  # a plain flag, not an Event: it is set from a signal handler in the thread that may wait


def stop_waiting() -> None:
    """SIGTERM arrived (preemption.py): no store waits out an outage any more; a request still gets
    botocore's quick retries, then fails with exit 143 so the replica stops in seconds."""
    global _stopped
    _stopped = True


def _wait(seconds: float) -> bool:
    """Sleep `seconds` in short slices; False as soon as stop_waiting() was called."""
    end = time.monotonic() + seconds
    while not _stopped and (left := end - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
    return not _stopped


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to 8 s, each drawn from its upper half,
    so replicas that failed together do not retry together."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def hash_while(digest: Callable[[], str], work: Callable[[], T]) -> tuple[str, T]:
    """(`digest()`, `work()`), with the digest computed in a second thread while the work runs.
    hashlib releases the GIL on large buffers, so a checksum of the same bytes overlaps the upload,
    fsync or load instead of adding its time."""
    outcome: dict[str, Any] = {}

    def hash_them() -> None:
        try:
            outcome["digest"] = digest()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=hash_them, name="kubetrain-sha256", daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["digest"], result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    """A place for named blobs. Implementations: FileStore, S3Store."""

    uri: str

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def write_serialized(self, key: str, serialize: Callable[[BinaryIO], object]) -> tuple[int, str]:
        """Store what `serialize(file)` writes under `key`; returns its size and SHA-256.
        Here: serialized into memory, then uploaded while a second thread hashes the same bytes."""
        buffer = io.BytesIO()
        serialize(buffer)
        data = buffer.getvalue()  # no copy: the buffer's own bytes
        digest, _ = hash_while(lambda: hashlib.sha256(data).hexdigest(), lambda: self.write_bytes(key, data))
        return len(data), digest

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` when the store is a local directory (read it in place), else None."""
        return None

    def write_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def read_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key below `prefix` (recursively) with its size in bytes; {} when none."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


class FileStore(Store):
    """A local or mounted directory (a PVC in a pod). Writes are atomic: temp file + rename."""

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise UserError(f"checkpoint.uri: {uri!r} must be file:///absolute/path (no host)")
        self.uri, self.root = uri, Path(unquote(parsed.path))

    def _path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def write_file(self, key: str, path: Path) -> None:
        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, f, 1 << 22)

        self._atomic(key, copy)

    def write_serialized(self, key: str, serialize: Callable[[BinaryIO], object]) -> tuple[int, str]:
        """Serialized straight into the temp file (no copy in memory); hashed from the page cache
        while fsync waits for the disk."""
        return self._atomic(key, serialize, hashed=True)

    def _atomic(self, key: str, fill: Callable[[BinaryIO], object], hashed: bool = False) -> tuple[int, str]:
        """Write `fill(file)` to a temp file, make it durable, then rename it into place: a reader sees
        the whole file or none. Returns (size, SHA-256 or "" unless `hashed`)."""
        target = self._path(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                digest = ""  # fsync: durable before it becomes visible
                if hashed:
                    digest, _ = hash_while(lambda: file_sha256(tmp), lambda: os.fsync(f.fileno()))
                else:
                    os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, target)
            return size, digest
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RetryableError(f"cannot write {self.url(key)}: {e}", EXIT_STORAGE_UNAVAILABLE) from e

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def sizes(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix)
        if not base.is_dir():
            return {}
        out = {}
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                out[p.relative_to(self.root).as_posix()] = p.stat().st_size
        return out

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        for parent in sorted({self._path(k).parent for k in keys}, key=lambda p: -len(p.parts)):
            try:
                parent.rmdir()  # remove now-empty step directories
            except OSError:
                pass


def s3_client(endpoint: str = "", region: str = "us-east-1", addressing_style: str = "path"):
    """A boto3 S3 client with standard retries and timeouts; credentials from the AWS env vars."""
    import boto3
    from botocore.config import Config

    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    web_identity = os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") and os.environ.get("AWS_ROLE_ARN")
    if not (key_id and secret) and not web_identity:
        raise UserError(
            "S3 credentials are missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster "
            "the chart sets them from the Secret named by s3.credentialsSecret)"
        )
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    config = Config(
        region_name=region or None,
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        max_pool_connections=MAX_CONCURRENCY + 4,
        s3={"addressing_style": addressing_style or "auto"},
        # No per-request CRC32 (botocore's default since 1.36, computed in Python as the body streams):
        # commit.json's SHA-256 already verifies every file end to end, and it cost ~10% of upload speed.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    # Explicit keys (not the default chain) so ~/.aws files and instance metadata never leak in.
    session = boto3.session.Session(
        aws_access_key_id=key_id or None, aws_secret_access_key=secret or None,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None, region_name=region or None,
    )
    return session.client("s3", endpoint_url=endpoint or None, config=config)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=MAX_CONCURRENCY, use_threads=True)


class S3Store(Store):
    """`s3://bucket/prefix` on AWS or any S3-compatible server (s3.endpoint)."""

    def __init__(self, uri: str, endpoint: str = "", region: str = "us-east-1", addressing_style: str = "path",
                 retry_seconds: float = S3Config.retry_seconds):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise UserError(f"checkpoint.uri: {uri!r} has no bucket (expected s3://bucket/prefix)")
        self.uri, self.bucket, self.prefix = uri, parsed.netloc, parsed.path.strip("/")
        self.endpoint = endpoint or "AWS"
        self.retry_seconds = retry_seconds
        self.client = s3_client(endpoint, region, addressing_style)
        self.transfer = transfer_config()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one operation; 5xx, throttling and connection trouble are retried with backoff for
        `retry_seconds`, then become RetryableError (exit 144; 143 once SIGTERM stopped the waiting)."""
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("NoSuchBucket",):
                    raise UserError(f"checkpoint.uri: bucket {self.bucket!r} does not exist at "
                                    f"{self.endpoint}") from None
                if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                    raise UserError(f"S3 refused {what} {self.url(key)} ({code}): check AWS_ACCESS_KEY_ID/"
                                    "AWS_SECRET_ACCESS_KEY and the bucket policy") from None
                if status < 500 and code not in TRANSIENT_CODES:
                    raise
                why = f"{status} {code}".strip()
                error: Exception = e
            except NoCredentialsError:
                raise UserError("S3 credentials are missing: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY") from None
            except (ConnectionError, HTTPClientError, OSError) as e:
                why, error = type(e).__name__, e
            left = deadline - time.monotonic()
            if left <= 0:
                break
            delay = min(backoff(attempt), left)
            if not _stopped:
                log.warning("storage: %s %s failed (%s); retry %d in %.1fs, giving up %.0fs from now",
                            what, self.url(key), why, attempt, delay, left)
            if not _wait(delay):
                raise RetryableError(f"stopped waiting for checkpoint store {self.endpoint} (SIGTERM): "
                                     f"{what} {self.url(key)} failed ({why})", EXIT_PREEMPTED) from None
        raise RetryableError(
            f"checkpoint store {self.endpoint} unreachable: {what} {self.url(key)} still failed after "
            f"{self.retry_seconds:g}s of retries (s3.retrySeconds; {why}: {error})", EXIT_STORAGE_UNAVAILABLE)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("upload", key, lambda: self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer))

    def write_file(self, key: str, path: Path) -> None:
        self._call("upload", key, lambda: self.client.upload_file(
            str(path), self.bucket, self._key(key), Config=self.transfer))

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            buf = io.BytesIO()
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
            return buf.getvalue()

        return self._call("download", key, get)

    def read_file(self, key: str, path: Path) -> None:
        self._call("download", key, lambda: self.client.download_file(
            self.bucket, self._key(key), str(path), Config=self.transfer))

    def sizes(self, prefix: str) -> dict[str, int]:
        def listing() -> dict[str, int]:
            out = {}
            strip = len(self.prefix) + 1 if self.prefix else 0
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][strip:]] = obj["Size"]
            return out

        return self._call("list", prefix, listing)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self._call("delete", keys[start], lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))


def open_store(uri: str, s3=None) -> Store:
    """The store for a `file://` or `s3://` URI; `s3` is the S3Config (endpoint, region, style)."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return FileStore(uri)
    if scheme == "s3":
        if s3 is None:
            return S3Store(uri)
        return S3Store(uri, s3.endpoint, s3.region, s3.addressing_style, s3.retry_seconds)
    raise UserError(f"checkpoint.uri: {uri!r} must start with file:// or s3://")
