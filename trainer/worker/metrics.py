"""Prometheus metrics of one rank: the one owner of every `kubetrain_*` metric.

Every rank serves `/metrics` on `metrics.port + local rank` (docs/architecture.md):
names start with `kubetrain_`, use base units, counters end in `_total`, and
the labels are `experiment` and `rank` (Prometheus' PodMonitor adds `pod`,
which joins with the DCGM exporter's GPU series). A private CollectorRegistry
keeps the process and platform collectors of prometheus-client out.

The training loop calls `observe_step` every step (a few lock-protected
additions, no device sync) and `observe_log` and `observe_efficiency` at log
steps, where the loop already synchronises to read the loss. With `metrics.enabled: false` every
method returns at once and no port is opened.

`observe_goodput` exports the goodput account (trainer/worker/goodput.py). The checkpoint manager reports through `observe_checkpoint_save`,
`observe_checkpoint_load` and `observe_checkpoint_failure`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               make_wsgi_app)

from trainer.errors import UserError

log = logging.getLogger(__name__)

# The local runner puts several replicas on one host: each gets its own port range.
PORT_OFFSET_ENV = "KUBETRAIN_METRICS_PORT_OFFSET"
# How many times the launcher restarted the job before this attempt.
RESTART_COUNT_ENV = "KUBETRAIN_RESTART_COUNT"
# Waiting for a final scrape never delays the exit by more than this.
FINAL_SCRAPE_TIMEOUT_SECONDS = 60.0

LABELS = ("experiment", "rank")
INFO_LABELS = ("task", "world_size", "backend", "precision", "parallelism", "version")
# Step times from milliseconds (small models on GPU) to minutes (large models, slow storage).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _ScrapeWatch:
    """A collector that yields nothing and records when the registry is scraped."""

    def __init__(self):
        self.count = 0
        self.last = 0.0
        # The longest of the last few gaps between scrapes: a stray `curl` between two of
        # Prometheus' scrapes must not shorten the expected scrape interval.
        self.recent_intervals: deque[float] = deque(maxlen=4)
        self.changed = threading.Condition()

    @property
    def interval(self) -> float:
        return max(self.recent_intervals, default=0.0)

    def describe(self):
        return []

    def collect(self):
        with self.changed:
            now = time.monotonic()
            if self.count:
                self.recent_intervals.append(now - self.last)
            self.count, self.last = self.count + 1, now
            self.changed.notify_all()
        return []


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus-client's server, except that `server_close` joins the requests in flight.

    Its own server runs them in daemon threads, so a rank that exits right after
    the final scrape started cut that response off, and Prometheus kept the
    values of the scrape before.
    """

    daemon_threads = False


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that connects and sends nothing cannot hold the exit for long

    def log_message(self, format, *args):  # one line per scrape would drown the training log
        pass


def _serve(registry: CollectorRegistry, port: int) -> WSGIServer:
    server = make_server("0.0.0.0", port, make_wsgi_app(registry), _MetricsServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class MetricsProcessor:
    """Every metric this rank exports, and the HTTP endpoint that serves them."""

    def __init__(self, experiment: str, rank: int, port: int, enabled: bool = True):
        self.enabled, self.port = enabled, port
        self.server = None
        if not enabled:
            return
        disable_created_metrics()  # no `_created` series: half the series, nothing a dashboard uses
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.scrapes = _ScrapeWatch()
        registry.register(self.scrapes)
        values = (experiment, str(rank))

        def metric(cls, name, doc, labelnames=LABELS, **kw):
            return cls(name, doc, labelnames=labelnames, registry=registry, **kw)

        self.info_family = metric(Gauge, "kubetrain_info", "Run description; the value is always 1.",
                                  LABELS + INFO_LABELS)
        self.label_values = values
        self.steps = metric(Counter, "kubetrain_steps", "Optimizer steps completed by this rank.").labels(*values)
        self.samples = metric(Counter, "kubetrain_samples",
                              "Training samples processed by this rank.").labels(*values)
        self.target_steps = metric(Gauge, "kubetrain_target_steps",
                                   "Optimizer steps this run stops at.").labels(*values)
        self.epoch = metric(Gauge, "kubetrain_epoch", "Current epoch, counted from 0.").labels(*values)
        # Gauges of a last observed value (losses, grad norm, last checkpoint, GPU memory: only on
        # CUDA) get their series at the first observation rather than claim a 0 before it.
        self.train_loss = metric(Gauge, "kubetrain_train_loss",
                                 "Mean training loss over the last log window, across ranks; "
                                 "NaN or Inf when training diverged.")
        self.eval_loss = metric(Gauge, "kubetrain_eval_loss",
                                "Loss over the whole eval set at the last evaluation.")
        self.eval_accuracy = metric(Gauge, "kubetrain_eval_accuracy_ratio",
                                    "Eval accuracy (0 to 1) at the last evaluation.")
        self.learning_rate = metric(Gauge, "kubetrain_learning_rate",
                                    "Learning rate of the last step.").labels(*values)
        self.grad_norm = metric(Gauge, "kubetrain_grad_norm",
                                "Total gradient L2 norm (before clipping) at the last log step.")
        self.step_duration = metric(Histogram, "kubetrain_step_duration_seconds",
                                    "Wall time of one optimizer step, data wait included.",
                                    buckets=STEP_BUCKETS).labels(*values)
        self.data_wait = metric(Counter, "kubetrain_data_wait_seconds",
                                "Time the loop waited for the next batch from the data loader.").labels(*values)
        self.heartbeat = metric(Gauge, "kubetrain_last_step_timestamp_seconds", "Unix time of the last "
                                "completed step or evaluation batch (or of the start): the heartbeat."
                                ).labels(*values)
        self.restarts = metric(Counter, "kubetrain_restarts", "Restarts of the job before this attempt, "
                               "as the launcher counts them.").labels(*values)
        self.checkpoint_save = metric(Histogram, "kubetrain_checkpoint_save_duration_seconds",
                                      "Time to write and commit one checkpoint.",
                                      buckets=CHECKPOINT_BUCKETS).labels(*values)
        self.checkpoint_load = metric(Histogram, "kubetrain_checkpoint_load_duration_seconds",
                                      "Time to read one checkpoint on resume.",
                                      buckets=CHECKPOINT_BUCKETS).labels(*values)
        self.checkpoint_saved_bytes = metric(Counter, "kubetrain_checkpoint_saved_bytes",
                                             "Bytes of checkpoints written by this rank.").labels(*values)
        self.checkpoint_loaded_bytes = metric(Counter, "kubetrain_checkpoint_loaded_bytes",
                                              "Bytes of checkpoints read by this rank.").labels(*values)
        self.checkpoint_last_step = metric(Gauge, "kubetrain_checkpoint_last_saved_step",
                                           "Step of the last committed checkpoint.")
        self.checkpoint_failures = metric(Counter, "kubetrain_checkpoint_failures",
                                          "Checkpoint saves or loads that failed.", LABELS + ("operation",))
        for operation in ("save", "load", "verify"):  # every series from the start: increase() sees the first
            self.checkpoint_failures.labels(*values, operation)
        # Efficiency (trainer/worker/efficiency.py): series only where the run has the figure.
        self.tokens = metric(Counter, "kubetrain_tokens", "Real (non-padding) tokens of the training batches "
                             "of this rank, counted by token tasks at log steps.")
        self.model_flops = metric(Gauge, "kubetrain_model_flops_per_step", "Model FLOPs of one optimizer step "
                                  "on this rank, counted on the first step with FlopCounterMode.")
        self.mfu = metric(Gauge, "kubetrain_mfu_ratio", "Model FLOPs utilisation over the last log window: "
                          "this rank's model FLOP/s over the device's peak (metrics.peakFlops or the known-GPU "
                          "table); no series where no peak is known.")
        self.gpu_allocated = metric(Gauge, "kubetrain_gpu_memory_allocated_bytes",
                                    "GPU memory held by tensors of this rank.")
        self.gpu_reserved = metric(Gauge, "kubetrain_gpu_memory_reserved_bytes",
                                   "GPU memory reserved by PyTorch's caching allocator on this rank.")
        self.gpu_peak = metric(Gauge, "kubetrain_gpu_memory_peak_bytes",
                               "Peak GPU memory held by tensors of this rank since the start.")
        self.gpu_utilization = metric(Gauge, "kubetrain_gpu_utilization_ratio", "Share of the last sample "
                                      "period in which a kernel ran on this rank's GPU (NVML, with nvidia-ml-py).")
        self.gpu_power = metric(Gauge, "kubetrain_gpu_power_watts",
                                "Power drawn by this rank's GPU (NVML, with nvidia-ml-py).")
        # Goodput (trainer/worker/goodput.py): since the experiment's first start, across restarts; gauges,
        # as a resumed attempt carries the account on from its checkpoint.
        self.goodput = metric(Gauge, "kubetrain_goodput_ratio", "Share of the experiment's wall time since its "
                              "first start (across restarts) spent in training steps that were kept.").labels(*values)
        self.goodput_productive = metric(Gauge, "kubetrain_goodput_productive_seconds", "Compute time of the "
                                         "kept training steps since the experiment's first start.").labels(*values)
        self.goodput_loss = metric(Gauge, "kubetrain_goodput_loss_seconds", "Wall time since the experiment's "
                                   "first start that produced no kept progress, by reason.", LABELS + ("reason",))

    @classmethod
    def from_config(cls, config, local_rank: int, rank: int) -> "MetricsProcessor":
        """The processor for this rank: port = metrics.port + local rank (+ the local runner's offset)."""
        offset = int(os.environ.get(PORT_OFFSET_ENV, "0") or 0)
        return cls(config.experiment, rank, config.metrics.port + offset + local_rank, config.metrics.enabled)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Serve /metrics on all interfaces (a pod's port is reached through its IP)."""
        if not self.enabled or self.server is not None:
            return
        try:
            self.server = _serve(self.registry, self.port)
        except OSError as e:
            raise UserError(f"metrics.port: cannot serve /metrics on port {self.port} "
                            f"(metrics.port + local rank): {e.strerror or e}") from None
        self.heartbeat.set_to_current_time()  # the start counts as progress for the stalled-heartbeat alert
        log.info("serving Prometheus metrics on :%d/metrics", self.port)

    def close(self, wait_for_scrape: bool = True) -> None:
        """Stop serving; when a Prometheus is scraping us, first let it take the final values once more.

        Without this the last loss, eval and step counts (and a NaN loss) of a run
        that ends between two scrapes would never reach Prometheus.
        """
        if self.server is None:
            return
        if wait_for_scrape and self.scrapes.count:
            seen = self.scrapes.count
            timeout = min(FINAL_SCRAPE_TIMEOUT_SECONDS, 1.5 * self.scrapes.interval + 1.0)
            with self.scrapes.changed:
                self.scrapes.changed.wait_for(lambda: self.scrapes.count > seen, timeout=timeout)
        self.server.shutdown()
        self.server.server_close()  # waits for the response of that final scrape to be written
        self.server = None

    # ------------------------------------------------------------ run-level facts
    def describe_run(self, config, world_size: int, backend: str, version: str) -> None:
        """The `_info` series, and the restarts the launcher counted before this attempt."""
        if not self.enabled:
            return
        t = config.training
        self.info_family.labels(*self.label_values, t.task, str(world_size), backend, t.precision,
                                t.parallelism, version).set(1)
        restarts = int(os.environ.get(RESTART_COUNT_ENV, "0") or 0)
        if restarts > 0:  # the counter carries on across restarts of the process
            self.restarts.inc(restarts)

    def observe_run_start(self, target_steps: int, step: int, epoch: int) -> None:
        if self.enabled:
            self.target_steps.set(target_steps)
            self.epoch.set(epoch)
            self.heartbeat.set_to_current_time()

    # ------------------------------------------------------------ the loop
    def observe_step(self, step_seconds: float, data_wait_seconds: float, samples: int, lr: float,
                     epoch: int) -> None:
        """Every step: host-side numbers only, never a device sync."""
        if not self.enabled:
            return
        self.steps.inc()
        self.samples.inc(samples)
        self.step_duration.observe(step_seconds)
        self.data_wait.inc(max(data_wait_seconds, 0.0))
        self.learning_rate.set(lr)
        self.epoch.set(epoch)
        self.heartbeat.set_to_current_time()

    def observe_progress(self) -> None:
        """Work that is not a step (an evaluation batch): the heartbeat only, so no stall alert."""
        if self.enabled:
            self.heartbeat.set_to_current_time()

    def observe_log(self, train_loss: float, grad_norm=None) -> None:
        """At log steps, where the loop has already synchronised; a NaN loss is exported as NaN.

        `grad_norm` is the tensor that clip_grad_norm_ returned (a DTensor under FSDP2).
        """
        if not self.enabled:
            return
        values = self.label_values
        self.train_loss.labels(*values).set(train_loss)
        if grad_norm is not None:
            if hasattr(grad_norm, "full_tensor"):  # sharded: a collective, which every rank reaches here
                grad_norm = grad_norm.full_tensor()
            self.grad_norm.labels(*values).set(float(grad_norm))

    def observe_efficiency(self, tokens: int | None, mfu: float | None, flops_per_step: float | None,
                           gpu: dict[str, float]) -> None:
        """At log steps: the window's real tokens (None: the task counts none), its MFU (None: no peak),
        and Efficiency.gpu_stats() (empty off CUDA)."""
        if not self.enabled:
            return
        values = self.label_values
        if tokens is not None:
            self.tokens.labels(*values).inc(tokens)
        if flops_per_step:
            self.model_flops.labels(*values).set(flops_per_step)
        if mfu is not None:
            self.mfu.labels(*values).set(mfu)
        gauges = {"allocated": self.gpu_allocated, "reserved": self.gpu_reserved, "peak": self.gpu_peak,
                  "utilization": self.gpu_utilization, "power_watts": self.gpu_power}
        for key, value in gpu.items():
            gauges[key].labels(*values).set(value)

    def observe_goodput(self, report: dict) -> None:
        """Goodput.report(): at the start (after a resume), at log steps and at the end."""
        if not self.enabled:
            return
        if report["goodput"] is not None:
            self.goodput.set(report["goodput"])
        self.goodput_productive.set(report["productive"])
        for reason, seconds in report["losses"].items():
            self.goodput_loss.labels(*self.label_values, reason).set(seconds)

    def observe_eval(self, loss: float | None, accuracy: float | None) -> None:
        if not self.enabled:
            return
        if loss is not None:
            self.eval_loss.labels(*self.label_values).set(loss)
        if accuracy is not None:
            self.eval_accuracy.labels(*self.label_values).set(accuracy)

    # ------------------------------------------------------------ checkpoints
    def observe_checkpoint_save(self, seconds: float, nbytes: int, step: int | None = None) -> None:
        """A committed checkpoint: its write time, its size on this rank and its step."""
        if not self.enabled:
            return
        self.checkpoint_save.observe(seconds)
        self.checkpoint_saved_bytes.inc(nbytes)
        if step is not None:
            self.checkpoint_last_step.labels(*self.label_values).set(step)

    def observe_checkpoint_load(self, seconds: float, nbytes: int) -> None:
        if self.enabled:
            self.checkpoint_load.observe(seconds)
            self.checkpoint_loaded_bytes.inc(nbytes)

    def observe_checkpoint_failure(self, operation: str) -> None:
        """`operation`: "save", "load", or "verify" (a committed step that failed its checks on resume)."""
        if self.enabled:
            self.checkpoint_failures.labels(*self.label_values, operation).inc()


DISABLED = MetricsProcessor("disabled", 0, 0, enabled=False)
