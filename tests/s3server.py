"""S3 server processes on loopback for tests and benchmarks: a real one (SeaweedFS) and a mock (moto).

Two servers, each in its own process, reached over TCP exactly as the trainer
reaches AWS or any S3-compatible store (boto3 with `s3.endpoint`):

  seaweedfs  SeaweedFS' `weed server -s3`, what the dev stack (k8s/seaweedfs) deploys, built
             from the Go module proxy by tests/build-seaweedfs.sh ($KUBETRAIN_WEED)
  moto       `python -m moto.server`, a mock S3; kept where a test needs what only it
             gives (its reset API), and as a second, independent implementation
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fault_proxy import FaultProxy, http_answer
from trainer.controller.local import free_port

# Test-only placeholders, never real credentials: moto accepts any keys, SeaweedFS gets these as its identity.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetrain-test", "AWS_SECRET_ACCESS_KEY": "kubetrain-test-secret"}
BACKENDS = ("seaweedfs", "moto")

# SeaweedFS' capacity, fixed rather than sized from the host's free disk (-volume.max=0 counts
# free disk / volume size, and each new bucket, a collection, grows 7 volumes at once: a handful of
# buckets used every slot on a disk with 12 GB free). WEED_VOLUMES slots of at most WEED_VOLUME_MB,
# none preallocated (a volume takes only the disk its objects fill), and, with the dev stack's own
# master.toml (k8s/seaweedfs/master-config.yaml), a collection grows one volume at a time: room for
# WEED_VOLUMES buckets on any disk that holds what is written.
WEED_VOLUMES = 200
WEED_VOLUME_MB = 64
WEED_MASTER_CONFIG = Path(__file__).resolve().parent.parent / "k8s" / "seaweedfs" / "master-config.yaml"


def weed_master_toml() -> str:
    return yaml.safe_load(WEED_MASTER_CONFIG.read_text())["data"]["master.toml"]


def weed_binary() -> str | None:
    path = os.environ.get("KUBETRAIN_WEED", "")
    return path if path and os.access(path, os.X_OK) else None


@dataclass
class S3Server:
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"  # where clients reach it (the node tier runs one at the node's address)
    backend: str = "moto"    # or "seaweedfs"
    workdir: Path | None = None
    data_dir: Path | None = None  # SeaweedFS' volumes and metadata (default: a folder of workdir)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a trainer process needs to reach this server (plus AWS_MAX_ATTEMPTS for fast tests)."""
        return {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "2"}

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kubetrain-{self.backend}-"))
        log = open(self.workdir / "server.log", "wb")
        if self.backend == "seaweedfs":
            argv = self._weed_argv()
        else:
            argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     env={**os.environ, **CREDENTIALS})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.backend} exited with {self.proc.returncode}: {self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.backend} did not answer on {self.endpoint} within {timeout}s: {self.log_tail()}")

    def _weed_argv(self) -> list[str]:
        """One process: master, volume server, filer and S3 gateway, every port its own (gRPC included:
        weed's default, port + 10000, can fall outside the range)."""
        weed = weed_binary()
        if not weed:
            raise RuntimeError("KUBETRAIN_WEED is not set (scripts/install-test-tools.sh builds weed)")
        identity = {"identities": [{"name": "kubetrain-test", "credentials": [
            {"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        (self.workdir / "s3.json").write_text(json.dumps(identity))
        (self.workdir / "master.toml").write_text(weed_master_toml())  # read from the working directory
        data = self.data_dir or self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(7)]
        return [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", f"-volume.port={ports[2]}",
                f"-volume.port.grpc={ports[3]}", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
                f"-master.volumeSizeLimitMB={WEED_VOLUME_MB}", f"-volume.max={WEED_VOLUMES}",
                "-master.volumePreallocate=false", "-master.telemetry=false",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={ports[6]}",
                f"-s3.config={self.workdir / 's3.json'}"]

    def _answers(self) -> bool:
        if self.backend == "moto":
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return True
            except OSError:
                return False
        try:  # SeaweedFS answers S3 only once its filer and volume server are up
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - connection refused, 503 while starting
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class SlowDownProxy(FaultProxy):
    """A proxy on loopback in front of a real S3 server: for `fail_seconds` it answers every request
    with 503 SlowDown (what S3 returns when it throttles), then forwards the bytes both ways. Without
    an upstream it answers 503 for ever. `refused` counts the 503 answers."""

    def __init__(self, upstream: S3Server | None = None, fail_seconds: float = float("inf")):
        until = time.monotonic() + fail_seconds
        answer = http_answer("503 Slow Down", SLOW_DOWN, "application/xml")
        super().__init__(upstream and (upstream.host, upstream.port),
                         lambda: answer if time.monotonic() < until else None)
