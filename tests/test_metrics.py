"""Per-rank /metrics, scraped by a real Prometheus during a 2-rank `kubetrain run` (the `live_run` fixture)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading

import pytest

from prometheus_server import free_port_pair, http_get
from support import run_cli, tool

LABELS_ALLOWED = {"experiment", "rank", "operation", "reason", "le",  # plus the _info metric's descriptive labels:
                  "task", "world_size", "backend", "precision", "parallelism", "version"}


def _by_rank(results: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in results}


def test_prometheus_holds_both_ranks_falling_loss_and_fresh_heartbeat(live_run):
    prom, summary, at_end = live_run.prometheus, live_run.summary, live_run.query_after_run
    steps = _by_rank(at_end('max_over_time(kubetrain_steps_total{experiment="metrics-demo"}[5m])'))
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

    # Scoped to the demo run: the token run (TOKENS_EXPERIMENT) follows it on the same ports within seconds.
    heartbeat = _by_rank(at_end('last_over_time(kubetrain_last_step_timestamp_seconds{experiment="metrics-demo"}[5m])'))
    for rank, stamp in heartbeat.items():
        assert live_run.ended - 30 < stamp <= live_run.ended, f"rank {rank} heartbeat is stale: {stamp}"

    info = at_end('last_over_time(kubetrain_info{experiment="metrics-demo"}[5m])')
    assert {i["metric"]["world_size"] for i in info} == {"2"}
    assert {i["metric"]["task"] for i in info} == {"cifar10-convnet"}

    eval_acc = _by_rank(at_end('last_over_time(kubetrain_eval_accuracy_ratio{experiment="metrics-demo"}[5m])'))
    assert eval_acc["0"] == pytest.approx(summary["eval_accuracy"])
    samples = _by_rank(at_end('max_over_time(kubetrain_samples_total{experiment="metrics-demo"}[5m])'))
    assert sum(samples.values()) == summary["steps"] * 16 * 2

    # Checkpoints every 200 of 600 steps, reported by the checkpoint manager on every rank.
    saves = _by_rank(at_end('max_over_time(kubetrain_checkpoint_save_duration_seconds_count{experiment="metrics-demo"}[5m])'))
    assert saves == {"0": 3, "1": 3}
    last_saved = _by_rank(at_end('last_over_time(kubetrain_checkpoint_last_saved_step{experiment="metrics-demo"}[5m])'))
    assert last_saved == {"0": 600, "1": 600}
    written = _by_rank(at_end('max_over_time(kubetrain_checkpoint_saved_bytes_total{experiment="metrics-demo"}[5m])'))
    assert written["0"] > 0

    # metrics.peakFlops gives the CPU run a peak: MFU from both ranks, with the same FLOPs per step.
    mfu = _by_rank(at_end('last_over_time(kubetrain_mfu_ratio{experiment="metrics-demo"}[5m])'))
    assert set(mfu) == {"0", "1"} and all(0 < v < 1 for v in mfu.values()), mfu
    flops = _by_rank(at_end('last_over_time(kubetrain_model_flops_per_step{experiment="metrics-demo"}[5m])'))
    assert set(flops) == {"0", "1"} and flops["0"] == flops["1"] > 0, flops


def test_prometheus_holds_the_real_tokens_of_both_ranks(live_run):
    """The token run: each rank's counter holds its own real tokens; together, what the summary reports."""
    from prometheus_server import TOKENS_EXPERIMENT

    at_end = lambda q: live_run.prometheus.query(q, time=live_run.tokens_ended + 2)  # noqa: E731
    tokens = _by_rank(at_end(f'max_over_time(kubetrain_tokens_total{{experiment="{TOKENS_EXPERIMENT}"}}[5m])'))
    assert set(tokens) == {"0", "1"} and all(v > 0 for v in tokens.values()), tokens
    summary = live_run.tokens_summary
    samples = summary["steps"] * 8 * 2  # batchSize 8 on 2 ranks
    wall = samples / summary["samples_per_second"]
    assert sum(tokens.values()) == pytest.approx(summary["tokens_per_second"] * wall, rel=1e-6)
    assert sum(tokens.values()) < samples * 16  # 16 positions per sample, most of them padding
    assert summary["mfu"] is not None


def test_prometheus_holds_the_goodput_and_its_losses_of_both_ranks(live_run):
    at_end = live_run.query_after_run
    summary = live_run.summary
    ratio = _by_rank(at_end('last_over_time(kubetrain_goodput_ratio{experiment="metrics-demo"}[5m])'))
    assert set(ratio) == {"0", "1"} and all(0 < r < 1 for r in ratio.values()), ratio
    # Rank 0's final value is the summary's figure, up to the time between the last scrape and the summary.
    assert ratio["0"] == pytest.approx(summary["goodput"], abs=0.05), (ratio, summary["goodput"])
    losses = at_end('last_over_time(kubetrain_goodput_loss_seconds{experiment="metrics-demo"}[5m])')
    reasons = {(r["metric"]["rank"], r["metric"]["reason"]) for r in losses}
    assert reasons == {(rank, reason) for rank in "01" for reason in summary["goodput_losses"]}, reasons
    startup = {r["metric"]["rank"]: float(r["value"][1]) for r in losses if r["metric"]["reason"] == "startup"}
    assert all(seconds > 0 for seconds in startup.values()), startup
    productive = _by_rank(at_end('last_over_time(kubetrain_goodput_productive_seconds{experiment="metrics-demo"}[5m])'))
    assert set(productive) == {"0", "1"} and all(p > 0 for p in productive.values()), productive


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
        "kubetrain_info", "kubetrain_tokens_total", "kubetrain_model_flops_per_step", "kubetrain_mfu_ratio",
        "kubetrain_gpu_memory_reserved_bytes", "kubetrain_gpu_utilization_ratio", "kubetrain_gpu_power_watts",
        "kubetrain_goodput_ratio", "kubetrain_goodput_productive_seconds", "kubetrain_goodput_loss_seconds",
    }
    assert expected <= set(families), expected - set(families)
    # On CPU the GPU gauges are declared but hold no series; a task without tokens has no token series.
    assert not re.search(r"^kubetrain_gpu_\w+\{", text, re.M)
    assert not re.search(r"^kubetrain_tokens_total\{", text, re.M)


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


def spy_on_waits(metrics) -> threading.Event:
    """An event set when close() starts waiting for a scrape (the tracker's Condition.wait_for)."""
    waiting, wait_for = threading.Event(), metrics.scrapes.changed.wait_for

    def spy(predicate, timeout=None):
        waiting.set()
        return wait_for(predicate, timeout=timeout)

    metrics.scrapes.changed.wait_for = spy
    return waiting


def test_close_waits_for_one_more_scrape_only_when_someone_scrapes():
    # Orderings, not wall-clock thresholds: what close() waits for, seen through its wait.
    from trainer.worker.metrics import MetricsProcessor

    unwatched = MetricsProcessor("demo", 0, free_port_pair())
    unwatched.start()
    waited = spy_on_waits(unwatched)
    unwatched.close()  # nobody ever scraped: no reason to wait
    assert not waited.is_set()

    watched = MetricsProcessor("demo", 0, free_port_pair())
    watched.start()
    url = f"http://127.0.0.1:{watched.port}/metrics"
    http_get(url)
    http_get(url)
    watched.scrapes.recent_intervals.append(30.0)  # as if Prometheus scraped every 30 s: close() waits up to 46 s
    waiting = spy_on_waits(watched)
    closer = threading.Thread(target=watched.close)
    closer.start()
    assert waiting.wait(30), "close() should wait for the final scrape"
    assert closer.is_alive()
    assert "kubetrain_steps_total" in http_get(url)  # the final scrape ends the wait
    closer.join(timeout=30)
    assert not closer.is_alive()


def test_close_returns_only_after_the_final_scrape_was_answered():
    """A rank exits right after close(): a response still being written would be cut off."""
    from trainer.worker.metrics import MetricsProcessor

    inside, release = threading.Event(), threading.Event()

    class HeldCollector:  # a registry that takes as long to render as the test wants
        def collect(self):
            if threading.current_thread() is not threading.main_thread():
                inside.set()
                release.wait(60)
            return []

    metrics = MetricsProcessor("demo", 0, free_port_pair())
    metrics.registry.register(HeldCollector())
    metrics.start()
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    answered = {}
    scraper = threading.Thread(target=lambda: answered.update(text=http_get(url, timeout=60)))
    scraper.start()
    assert inside.wait(30), "the scrape never reached the registry"
    closer = threading.Thread(target=metrics.close, kwargs={"wait_for_scrape": False})
    closer.start()
    closer.join(timeout=3)  # without joining the request, close() returns within the 0.5 s shutdown poll
    assert closer.is_alive(), "close() returned while the final scrape was still being answered"
    release.set()
    closer.join(timeout=60)
    scraper.join(timeout=60)
    assert not closer.is_alive() and "kubetrain_steps_total" in answered["text"]
