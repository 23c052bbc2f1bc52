"""A real Prometheus on loopback, and the one live 2-rank run it scrapes per test session.

`live_metrics_run` serves the `live_run` fixture (tests/conftest.py) that the
metrics, dashboard and alert tests share: Prometheus scrapes both ranks every
second while the run trains, and a poller keeps one raw scrape of each rank for
`promtool check metrics`. A second, shorter 2-rank run of a token task
(tests/fixtures/token_stack.py) follows on the same ports, so that the token
series exist too.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support import EXAMPLES, REPO, run_cli, tool

TOKENS_EXPERIMENT = "metrics-tokens"


def free_port_pair() -> int:
    """A port P with P and P+1 free: metrics.port for rank 0, and rank 1's offset port."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def query(prometheus_url: str, promql: str, **params) -> list[dict]:
    """The HTTP API's result list: an instant query, or a range query when `step` is given."""
    url = f"{prometheus_url}/api/v1/{'query_range' if 'step' in params else 'query'}?" + urllib.parse.urlencode(
        {"query": promql, **params})
    body = json.loads(http_get(url, timeout=10))
    assert body["status"] == "success", body
    return body["data"]["result"]


class Prometheus:
    """A real Prometheus server on loopback with its own config and TSDB in tmp_path."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]):
        taken = {int(target.rsplit(":", 1)[1]) for target in targets}
        self.port = free_port_pair()
        while self.port in taken:  # a free port now may be the one a target binds later (rank 1's P+1)
            self.port = free_port_pair()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kubetrain", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(self.url + "/-/ready")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()}")
                time.sleep(0.2)

    def wait_until_scraping(self, targets: list[str], timeout: float = 60.0) -> None:
        """Block until Prometheus has tried every target once (a refused scrape counts).

        Ready is not scraping: target discovery hands targets over in batches up to
        5 s apart, and a run that ends inside that window leaves no samples at all.
        """
        deadline = time.monotonic() + timeout
        while True:
            active = json.loads(http_get(self.url + "/api/v1/targets"))["data"]["activeTargets"]
            tried = {t["labels"]["instance"] for t in active if not t["lastScrape"].startswith("0001-")}
            if tried >= set(targets):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus has not scraped {sorted(set(targets) - tried)} after {timeout} s")
            time.sleep(0.2)

    def query(self, promql: str, **params) -> list[dict]:
        return query(self.url, promql, **params)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class ScrapeKeeper(threading.Thread):
    """Polls a rank's endpoint until it has one scrape taken after the first log step.

    It stops then: a trainer waits for one more scrape before it exits, and that
    one should be Prometheus'.
    """

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.text, self.done = url, "", threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = http_get(self.url)
                if re.search(r"^kubetrain_train_loss\{", text, re.M):
                    self.text = text  # after the first log step: the families have their series
                    return
            except OSError:
                pass
            self.done.wait(0.5)


@dataclass
class LiveRun:
    prometheus: Prometheus
    summary: dict
    started: float
    ended: float
    scrapes: dict[int, str] = field(default_factory=dict)  # rank -> raw /metrics text
    tokens_summary: dict = field(default_factory=dict)  # of the token run after it (TOKENS_EXPERIMENT)
    tokens_ended: float = 0.0

    def query_after_run(self, promql: str) -> list[dict]:
        """An instant query evaluated just after the run ended, whenever a test asks.

        The session's run may be minutes old by the time a test module runs, and
        a `[5m]` window evaluated now would no longer reach it.
        """
        return self.prometheus.query(promql, time=self.ended + 2)

    def last_scrape_time(self) -> float:
        """When Prometheus last held live series of the run (they go stale once it ended)."""
        result = self.prometheus.query('kubetrain_steps_total{rank="0"}', start=self.started,
                                       end=self.ended + 2, step=0.5)
        return max(float(t) for t, _ in result[0]["values"])

    def last_tokens_scrape_time(self) -> float:
        """When Prometheus last held live series of the token run."""
        result = self.prometheus.query(f'kubetrain_steps_total{{experiment="{TOKENS_EXPERIMENT}",rank="0"}}',
                                       start=self.ended, end=self.tokens_ended + 2, step=0.5)
        return max(float(t) for t, _ in result[0]["values"])

    def metric_names(self) -> set[str]:
        """Metric names as exposed (histograms with their _bucket/_sum/_count series)."""
        names = set()
        for text in self.scrapes.values():
            names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
            for family, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
                suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
                names |= {family + s for s in suffixes}  # families with no series yet (GPU on CPU)
        return names

@contextlib.contextmanager
def live_metrics_run(workdir: Path) -> Iterator[LiveRun]:
    """A 2-rank quickstart run scraped by a fresh Prometheus, which is queried until the with-block ends."""
    prometheus_bin = tool("KUBETRAIN_PROMETHEUS", "prometheus")
    port = free_port_pair()
    targets = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    prometheus = Prometheus(prometheus_bin, workdir, targets)
    try:
        prometheus.wait_until_scraping(targets)
        keepers = {rank: ScrapeKeeper(f"http://{target}/metrics") for rank, target in enumerate(targets)}
        for keeper in keepers.values():
            keeper.start()
        started = time.time()
        result = run_cli(
            "run", "metrics-demo", "-f", str(EXAMPLES / "quickstart.yaml"), "--workdir", str(workdir / "run"),
            # Long enough (~10 s on an idle 2-core box) for several 1 s scrapes even on a fast machine.
            "--set", f"metrics.port={port},training.maxSteps=600,training.epochs=10,training.logEverySteps=20",
            "--set", "metrics.peakFlops=1000000000000",  # a CPU has no known peak: MFU against this one
            "--set", "training.data.trainSamples=2048,training.data.evalSamples=256,training.batchSize=16",
            "--set", f"checkpoint.uri={(workdir / 'checkpoints').as_uri()},checkpoint.everySteps=200",
            env={"OMP_NUM_THREADS": "1"},
        )
        ended = time.time()
        for keeper in keepers.values():
            keeper.done.set()
            keeper.join()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        tokens = run_cli(
            "run", TOKENS_EXPERIMENT, "--workdir", str(workdir / "tokens"),
            "--set", "training.task=custom,training.entrypoint=token_stack:build",
            "--set-json", f"training.pythonPath={json.dumps([str(REPO / 'tests' / 'fixtures')])}",
            "--set-json", 'training.options={"samples": 1024}',
            "--set", f"metrics.port={port},training.maxSteps=400,training.epochs=10,training.logEverySteps=20",
            "--set", "training.batchSize=8,metrics.peakFlops=1000000000000",
            env={"OMP_NUM_THREADS": "1"},
        )
        assert tokens.returncode == 0, tokens.stdout[-3000:] + tokens.stderr
        tokens_ended = time.time()
        time.sleep(1.5)  # let the last scrapes land in the TSDB
        yield LiveRun(prometheus, result.summary, started, ended, {r: k.text for r, k in keepers.items()},
                      tokens.summary, tokens_ended)
    finally:
        prometheus.stop()
