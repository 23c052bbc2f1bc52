"""Per-rank /metrics, scraped by a real Prometheus during a 2-rank `kubetrain run`.

One run per session serves every test here, in test_dashboard.py and test_alerts.py: a
Prometheus started on loopback scrapes both ranks every second while the run
trains, and a poller keeps one raw scrape of each rank for `promtool check metrics`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from support import EXAMPLES, run_cli

LABELS_ALLOWED = {"experiment", "rank", "operation", "le",  # plus the _info metric's descriptive labels:
                  "task", "world_size", "backend", "precision", "parallelism", "version"}


def tool(env_var: str, name: str) -> str:
    path = os.environ.get(env_var) or shutil.which(name)
    if not path:
        pytest.skip(f"{name} not found: set {env_var} or put it on PATH (scripts/install-test-tools.sh)")
    return path


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


class Prometheus:
    """A real Prometheus server on loopback with its own config and TSDB in tmp_path."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]):
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
        url = f"{self.url}/api/v1/{'query_range' if 'step' in params else 'query'}?" + urllib.parse.urlencode(
            {"query": promql, **params})
        body = json.loads(http_get(url, timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

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

    def last_scrape_time(self) -> float:
        """When Prometheus last held live series of the run (they go stale once it ended)."""
        result = self.prometheus.query('kubetrain_steps_total{rank="0"}', start=self.started,
                                       end=self.ended + 2, step=0.5)
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


_LIVE_RUNS: list[LiveRun] = []  # test_dashboard.py and test_alerts.py import the fixture: one run per session


@pytest.fixture(scope="session")
def live_run(tmp_path_factory):
    if _LIVE_RUNS:
        yield _LIVE_RUNS[0]
        return
    prometheus_bin = tool("KUBETRAIN_PROMETHEUS", "prometheus")
    workdir = tmp_path_factory.mktemp("metrics")
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
            "--set", "training.data.trainSamples=2048,training.data.evalSamples=256,training.batchSize=16",
            "--set", f"checkpoint.uri={(workdir / 'checkpoints').as_uri()},checkpoint.everySteps=200",
            env={"OMP_NUM_THREADS": "1"},
        )
        ended = time.time()
        for keeper in keepers.values():
            keeper.done.set()
            keeper.join()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        time.sleep(1.5)  # let the last scrapes land in the TSDB
        _LIVE_RUNS.append(LiveRun(prometheus, result.summary, started, ended, {r: k.text for r, k in keepers.items()}))
        yield _LIVE_RUNS[0]
    finally:
        prometheus.stop()


def _by_rank(results: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in results}


def test_prometheus_holds_both_ranks_falling_loss_and_fresh_heartbeat(live_run):
    prom, summary = live_run.prometheus, live_run.summary
    steps = _by_rank(prom.query('max_over_time(kubetrain_steps_total{experiment="metrics-demo"}[5m])'))
    assert set(steps) == {"0", "1"}, (f"series from both ranks expected, got {steps}; targets: "
                                      f"{http_get(prom.url + '/api/v1/targets')[:2000]}")
    # The trainer waits for one more scrape before it exits: the final step count is in Prometheus.
    assert steps == {"0": summary["steps"], "1": summary["steps"]}

    loss = prom.query('kubetrain_train_loss{experiment="metrics-demo",rank="0"}',
                      start=live_run.started, end=live_run.ended + 2, step=1)
    values = [float(v) for _, v in loss[0]["values"]]
    assert len(values) >= 3, f"scraped too rarely: {values}"
    assert values[-1] < 0.5 * values[0], f"loss did not fall in Prometheus: {values}"
    assert values[-1] == pytest.approx(summary["train_loss"], rel=1e-6)

    heartbeat = _by_rank(prom.query('last_over_time(kubetrain_last_step_timestamp_seconds[5m])'))
    for rank, stamp in heartbeat.items():
        assert live_run.ended - 30 < stamp <= live_run.ended, f"rank {rank} heartbeat is stale: {stamp}"

    info = prom.query('kubetrain_info{experiment="metrics-demo"}', time=live_run.ended)
    info = info or prom.query('last_over_time(kubetrain_info{experiment="metrics-demo"}[5m])')
    assert {i["metric"]["world_size"] for i in info} == {"2"}
    assert {i["metric"]["task"] for i in info} == {"cifar10-convnet"}

    eval_acc = _by_rank(prom.query('last_over_time(kubetrain_eval_accuracy_ratio[5m])'))
    assert eval_acc["0"] == pytest.approx(summary["eval_accuracy"])
    samples = _by_rank(prom.query('max_over_time(kubetrain_samples_total[5m])'))
    assert sum(samples.values()) == summary["steps"] * 16 * 2

    # Checkpoints every 200 of 600 steps, reported by the checkpoint manager on every rank.
    saves = _by_rank(prom.query('max_over_time(kubetrain_checkpoint_save_duration_seconds_count[5m])'))
    assert saves == {"0": 3, "1": 3}
    last_saved = _by_rank(prom.query('last_over_time(kubetrain_checkpoint_last_saved_step[5m])'))
    assert last_saved == {"0": 600, "1": 600}
    written = _by_rank(prom.query('max_over_time(kubetrain_checkpoint_saved_bytes_total[5m])'))
    assert written["0"] > 0


def test_live_scrape_passes_promtool_check_metrics(live_run):
    promtool = tool("KUBETRAIN_PROMTOOL", "promtool")
    for rank, text in live_run.scrapes.items():
        assert "kubetrain_steps_total" in text, f"no scrape of rank {rank} was taken during the run"
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), \
            f"rank {rank}: {check.stdout}{check.stderr}"


def test_exported_names_and_labels_follow_the_conventions(live_run):
    text = live_run.scrapes[1]
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    assert all(name.startswith("kubetrain_") for name in families), families
    for name, kind in families.items():
        assert name.endswith("_total") == (kind == "counter"), name
    for labels in re.findall(r"^kubetrain_\w+\{([^}]*)\}", text, re.M):
        names = set(re.findall(r'(\w+)="', labels))
        assert {"experiment", "rank"} <= names <= LABELS_ALLOWED, labels
    assert 'rank="1"' in text and 'experiment="metrics-demo"' in text
    expected = {
        "kubetrain_steps_total", "kubetrain_samples_total", "kubetrain_train_loss", "kubetrain_eval_loss",
        "kubetrain_eval_accuracy_ratio", "kubetrain_learning_rate", "kubetrain_step_duration_seconds",
        "kubetrain_data_wait_seconds_total", "kubetrain_grad_norm", "kubetrain_epoch",
        "kubetrain_last_step_timestamp_seconds", "kubetrain_checkpoint_save_duration_seconds",
        "kubetrain_checkpoint_load_duration_seconds", "kubetrain_checkpoint_saved_bytes_total",
        "kubetrain_checkpoint_loaded_bytes_total", "kubetrain_checkpoint_failures_total",
        "kubetrain_restarts_total", "kubetrain_gpu_memory_allocated_bytes", "kubetrain_gpu_memory_peak_bytes",
        "kubetrain_info",
    }
    assert expected <= set(families), expected - set(families)
    # On CPU the GPU gauges are declared but hold no series.
    assert not re.search(r"^kubetrain_gpu_memory_\w+\{", text, re.M)


def test_a_taken_metrics_port_is_a_one_line_user_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "busy", "--workdir", str(tmp_path), "--set",
                         f"job.nodes=1,metrics.port={port},training.maxSteps=1,training.data.trainSamples=64")
    assert result.returncode == 2, result.stdout[-2000:]
    assert re.search(rf"metrics\.port: cannot serve /metrics on port {port}", result.stdout)
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------- in-process, no training
def _exposition(processor) -> str:
    from prometheus_client import generate_latest

    return generate_latest(processor.registry).decode()


def test_checkpoint_and_restart_metrics_for_the_checkpoint_manager(monkeypatch, tmp_path):
    from trainer.config import load_trainer_config
    from trainer.worker.metrics import RESTART_COUNT_ENV, MetricsProcessor

    monkeypatch.setenv(RESTART_COUNT_ENV, "2")
    metrics = MetricsProcessor("demo", 3, port=0)
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "demo"}))
    config = load_trainer_config(tmp_path / "config.json")
    metrics.describe_run(config, 4, "nccl", "0.1.0")
    metrics.observe_checkpoint_save(2.5, 1_000_000, step=100)
    metrics.observe_checkpoint_load(1.25, 1_000_000)
    metrics.observe_checkpoint_failure("save")
    metrics.observe_log(float("nan"))
    text = _exposition(metrics)
    assert 'kubetrain_restarts_total{experiment="demo",rank="3"} 2.0' in text
    assert 'kubetrain_checkpoint_save_duration_seconds_sum{experiment="demo",rank="3"} 2.5' in text
    assert 'kubetrain_checkpoint_saved_bytes_total{experiment="demo",rank="3"} 1e+06' in text
    assert 'kubetrain_checkpoint_last_saved_step{experiment="demo",rank="3"} 100.0' in text
    assert 'kubetrain_checkpoint_failures_total{experiment="demo",operation="save",rank="3"} 1.0' in text
    assert 'kubetrain_train_loss{experiment="demo",rank="3"} NaN' in text  # what the NaN alert matches
    assert 'backend="nccl"' in text and 'world_size="4"' in text


def test_disabled_metrics_open_no_port_and_record_nothing():
    from trainer.worker.metrics import MetricsProcessor

    port = free_port_pair()
    metrics = MetricsProcessor("demo", 0, port, enabled=False)
    metrics.start()
    metrics.observe_step(0.1, 0.01, 32, 1e-3, 0)
    metrics.observe_checkpoint_save(1.0, 10)
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # still free
    metrics.close()


def test_close_waits_for_one_more_scrape_only_when_someone_scrapes():
    from trainer.worker.metrics import MetricsProcessor

    unwatched = MetricsProcessor("demo", 0, free_port_pair())
    unwatched.start()
    began = time.monotonic()
    unwatched.close()  # nobody ever scraped: no reason to wait
    assert time.monotonic() - began < 1.0  # the HTTP server's shutdown polls every 0.5 s

    watched = MetricsProcessor("demo", 0, free_port_pair())
    watched.start()
    url = f"http://127.0.0.1:{watched.port}/metrics"
    http_get(url)
    time.sleep(0.5)
    http_get(url)  # a scraper every 0.5 s: close() waits up to 1.5 intervals + 1 s for the next one
    closer = threading.Thread(target=watched.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "close() should wait for the final scrape"
    assert "kubetrain_steps_total" in http_get(url)
    closer.join(timeout=2)
    assert not closer.is_alive()


def test_close_returns_only_after_the_final_scrape_was_answered():
    """A rank exits right after close(): a response still being written would be cut off."""
    from trainer.worker.metrics import MetricsProcessor

    class SlowCollector:  # stands in for a registry that takes a while to render
        def collect(self):
            time.sleep(1.5)  # longer than the server's 0.5 s shutdown poll
            return []

    metrics = MetricsProcessor("demo", 0, free_port_pair())
    metrics.registry.register(SlowCollector())
    metrics.start()
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    http_get(url)
    answered = {}

    def final_scrape():
        time.sleep(0.2)
        answered["text"] = http_get(url)
        answered["at"] = time.monotonic()

    scraper = threading.Thread(target=final_scrape)
    scraper.start()
    metrics.close()
    closed_at = time.monotonic()
    scraper.join(timeout=5)
    assert "kubetrain_steps_total" in answered["text"]
    # The client notes the time a moment after the server wrote the answer, hence the slack.
    late = answered["at"] - closed_at
    assert late < 0.3, f"close() returned {late:.2f} s before the final scrape was answered"
