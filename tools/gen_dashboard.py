"""Generate the chart's Grafana dashboard: helm/kubetrain/files/dashboard.json.

    python tools/gen_dashboard.py           # rewrite the JSON
    python tools/gen_dashboard.py --check   # exit 1 when the committed JSON is stale

Panels are declared below as (title, unit, [(PromQL, legend)]); the JSON is
Grafana's dashboard model (schemaVersion 39). The chart ships it in a ConfigMap
labelled grafana_dashboard: "1" for Grafana's sidecar. Variables: datasource,
experiment (from kubetrain_info) and rank (multi-select).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "helm" / "kubetrain" / "files" / "dashboard.json"

SEL = 'experiment="$experiment", rank=~"$rank"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def rate(metric: str, window: str = "$__rate_interval") -> str:
    return f"rate({metric}{{{SEL}}}[{window}])"


def quantile(q: float, histogram: str, by: str = "le", window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(histogram + '_bucket', window)}))"


# One pod runs nprocPerNode ranks; the DCGM exporter labels each GPU series with the pod using it.
PODS = f'group by (pod) (kubetrain_info{{{SEL}}})'

STATS = [  # (title, unit, expr)
    ("Step", "none", f'max(kubetrain_steps_total{{{SEL}}})'),
    ("Progress", "percentunit",
     f'max(kubetrain_steps_total{{{SEL}}}) / max(kubetrain_target_steps{{{SEL}}})'),
    ("Samples/s (total)", "short", f"sum({rate('kubetrain_samples_total')})"),
    ("Since last step", "s", f'time() - min(kubetrain_last_step_timestamp_seconds{{{SEL}}})'),
    ("Restarts", "none", f'max(kubetrain_restarts_total{{{SEL}}})'),
    ("Checkpoint failures", "none", f'sum(kubetrain_checkpoint_failures_total{{{SEL}}})'),
]

ROWS = [  # (row title, [(panel title, unit, [(expr, legend)])])
    ("Learning", [
        ("Loss", "none", [
            (f'avg(kubetrain_train_loss{{{SEL}}})', "train"),
            (f'avg(kubetrain_eval_loss{{{SEL}}})', "eval"),
        ]),
        ("Eval accuracy", "percentunit", [(f'avg(kubetrain_eval_accuracy_ratio{{{SEL}}})', "accuracy")]),
        ("Learning rate", "none", [(f'avg(kubetrain_learning_rate{{{SEL}}})', "lr")]),
        ("Gradient norm", "none", [(f'avg(kubetrain_grad_norm{{{SEL}}})', "grad norm")]),
    ]),
    ("Throughput", [
        ("Samples/s per rank and total", "short", [
            (f"sum by (rank) ({rate('kubetrain_samples_total')})", "rank {{rank}}"),
            (f"sum({rate('kubetrain_samples_total')})", "total"),
        ]),
        ("Step time p50 / p95", "s", [
            (quantile(0.5, "kubetrain_step_duration_seconds"), "p50"),
            (quantile(0.95, "kubetrain_step_duration_seconds"), "p95"),
            (quantile(0.95, "kubetrain_step_duration_seconds", by="le, rank"), "p95 rank {{rank}}"),
        ]),
        ("Data wait (share of step time)", "percentunit", [
            (f"sum by (rank) ({rate('kubetrain_data_wait_seconds_total')}) / "
             f"sum by (rank) ({rate('kubetrain_step_duration_seconds_sum')})", "rank {{rank}}"),
        ]),
        ("Epoch", "none", [(f'max(kubetrain_epoch{{{SEL}}})', "epoch")]),
        ("Tokens/s per rank and total", "short", [
            (f"sum by (rank) ({rate('kubetrain_tokens_total')})", "rank {{rank}}"),
            (f"sum({rate('kubetrain_tokens_total')})", "total"),
        ]),
        ("MFU per rank", "percentunit", [(f'kubetrain_mfu_ratio{{{SEL}}}', "rank {{rank}}")]),
    ]),
    ("Checkpoints", [
        ("Checkpoint save / load duration (mean over 15m)", "s", [
            (f"sum by (rank) ({rate('kubetrain_checkpoint_save_duration_seconds_sum', '15m')}) / "
             f"sum by (rank) ({rate('kubetrain_checkpoint_save_duration_seconds_count', '15m')})",
             "save rank {{rank}}"),
            (f"sum by (rank) ({rate('kubetrain_checkpoint_load_duration_seconds_sum', '15m')}) / "
             f"sum by (rank) ({rate('kubetrain_checkpoint_load_duration_seconds_count', '15m')})",
             "load rank {{rank}}"),
        ]),
        ("Checkpoint bytes written / read per second (over 15m)", "Bps", [
            (f"sum({rate('kubetrain_checkpoint_saved_bytes_total', '15m')})", "written"),
            (f"sum({rate('kubetrain_checkpoint_loaded_bytes_total', '15m')})", "read"),
        ]),
        ("Last committed checkpoint step", "none", [
            (f'max(kubetrain_checkpoint_last_saved_step{{{SEL}}})', "step"),
        ]),
    ]),
    ("Goodput", [
        ("Goodput per rank", "percentunit", [(f'kubetrain_goodput_ratio{{{SEL}}}', "rank {{rank}}")]),
        ("Where the experiment's time went", "s", [
            (f'max(kubetrain_goodput_productive_seconds{{{SEL}}})', "productive"),
            (f'max by (reason) (kubetrain_goodput_loss_seconds{{{SEL}}})', "{{reason}}"),
        ]),
    ]),
    ("GPU", [
        ("GPU memory allocated / reserved / peak", "bytes", [
            (f'kubetrain_gpu_memory_allocated_bytes{{{SEL}}}', "allocated rank {{rank}}"),
            (f'kubetrain_gpu_memory_reserved_bytes{{{SEL}}}', "reserved rank {{rank}}"),
            (f'kubetrain_gpu_memory_peak_bytes{{{SEL}}}', "peak rank {{rank}}"),
        ]),
        ("GPU utilisation (DCGM)", "percent", [
            (f"DCGM_FI_DEV_GPU_UTIL * on (pod) group_left() {PODS}", "{{pod}} GPU {{gpu}}"),
        ]),
    ]),
]


# Every panel's description (Grafana shows it in the panel's (i) tooltip); a test checks each has one.
DESCRIPTIONS = {
    "Step": "Optimizer steps done so far (the highest rank's count; all ranks step together).",
    "Progress": "Steps done over the steps the run will take (training.epochs or training.maxSteps).",
    "Samples/s (total)": "Training samples per second summed over every rank, over Grafana's rate interval.",
    "Since last step": "Seconds since the slowest rank finished a step: growing without bound means a hang "
                       "(the KubetrainHeartbeatStalled alert fires after 10 minutes).",
    "Restarts": "How often the job's pods were restarted and resumed (KUBETRAIN_RESTART_COUNT / the operator).",
    "Checkpoint failures": "Checkpoint saves that failed on any rank; the run keeps going and retries at the "
                           "next save, so a rising count means the store is failing.",
    "Loss": "Training loss (mean over the logging window) and the last evaluation's loss, averaged over ranks.",
    "Eval accuracy": "Accuracy on the evaluation set at the last evaluation (every training.evalEveryEpochs).",
    "Learning rate": "The optimizer's current learning rate (warmup, then the training.lrSchedule decay).",
    "Gradient norm": "Global gradient norm before clipping (training.gradClipNorm); spikes precede divergence.",
    "Samples/s per rank and total": "Throughput of each rank and of the job; one slow rank slows every rank "
                                    "(DDP waits for it at each allreduce).",
    "Step time p50 / p95": "Wall time per optimizer step, data wait included, from the step histogram.",
    "Data wait (share of step time)": "Time spent waiting for the next batch over wall time per step: "
                                      "near 1 means the data loader is the bottleneck (raise numWorkers).",
    "Epoch": "The epoch being trained (from 0).",
    "Tokens/s per rank and total": "Real (non-padding) training tokens per second of each rank and of the job; "
                                   "only token tasks (bert-sentiment, causal-lm, custom tasks with count_tokens) "
                                   "count them.",
    "MFU per rank": "Model FLOPs utilisation over each rank's last log window: model FLOPs per step (counted on "
                    "the first step) times steps/s over the GPU's dense peak at training.precision, or "
                    "metrics.peakFlops. No series where no peak is known (CPU, an unlisted GPU).",
    "Checkpoint save / load duration (mean over 15m)": "Mean seconds per checkpoint save and load on each rank. "
                                                       "Saves are minutes apart, so the window is a fixed 15m "
                                                       "rather than the scrape-based rate interval.",
    "Checkpoint bytes written / read per second (over 15m)":
        "Checkpoint bytes moved to and from the store, averaged over 15m (saves are rare; a scrape-interval "
        "rate would be mostly 0).",
    "Last committed checkpoint step": "The newest step whose checkpoint is committed: what a restart resumes from.",
    "Goodput per rank": "The share of the experiment's wall time since its first start, across restarts and "
                        "resumes, spent in training steps that were kept (KubetrainLowGoodput fires under "
                        "metrics.prometheusRule.goodputBelow).",
    "Where the experiment's time went": "Seconds since the experiment's first start: kept step time (productive) "
                                        "and each loss: start-up, data wait, checkpoint stall, evaluation, work "
                                        "lost after the last checkpoint of an attempt that died, time between "
                                        "attempts, and the rest (other).",
    "GPU memory allocated / reserved / peak": "CUDA memory held by tensors on each rank, what PyTorch's caching "
                                              "allocator reserved (what the GPU sees in use), and the tensors' "
                                              "peak since the start.",
    "GPU utilisation (DCGM)": "DCGM_FI_DEV_GPU_UTIL of the GPUs used by this experiment's pods, joined on "
                              "`pod`. The DCGM exporter must be scraped with honorLabels: true so that `pod` is "
                              "the training pod (not the exporter's).",
}


def target(expr: str, legend: str, ref: int) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + ref)}


def timeseries(panel_id: int, title: str, unit: str, queries, grid: dict) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": title, "description": DESCRIPTIONS[title],
        "datasource": DS, "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0,
                                                              "spanNulls": True}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [target(expr, legend, i) for i, (expr, legend) in enumerate(queries)],
    }


def stat(panel_id: int, title: str, unit: str, expr: str, x: int) -> dict:
    return {
        "id": panel_id, "type": "stat", "title": title, "description": DESCRIPTIONS[title], "datasource": DS,
        "gridPos": {"h": 4, "w": 4, "x": x, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit, **({"decimals": 0} if unit == "none" else {})},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "none", "textMode": "auto"},
        "targets": [target(expr, title, 0)],
    }


def variable(name: str, label: str, query: str, multi: bool) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
        "refresh": 2, "sort": 3 if name == "rank" else 1, "multi": multi, "includeAll": multi,
        **({"allValue": ".*", "current": {"text": "All", "value": "$__all"}} if multi else {"current": {}}),
    }


def dashboard() -> dict:
    panels, next_id = [], 1
    for i, (title, unit, expr) in enumerate(STATS):
        panels.append(stat(next_id, title, unit, expr, 4 * i))
        next_id += 1
    y = 4
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        width = 24 // len(row_panels) if len(row_panels) < 4 else 12
        for i, (title, unit, queries) in enumerate(row_panels):
            per_line = 24 // width
            grid = {"h": 8, "w": width, "x": (i % per_line) * width, "y": y + (i // per_line) * 8}
            panels.append(timeseries(next_id, title, unit, queries, grid))
            next_id += 1
        y += 8 * ((len(row_panels) + (24 // width) - 1) // (24 // width))
    return {
        # Filled in per release (configmap-dashboard.yaml): two experiments in one Grafana must not collide.
        "uid": "__DASHBOARD_UID__",
        "title": "kubetrain: __EXPERIMENT__",
        "description": "One kubetrain experiment: loss, throughput, step time, data wait, goodput, checkpoints and GPUs "
                       "per rank (metrics from every rank's /metrics; GPU utilisation from the DCGM exporter).",
        "tags": ["kubetrain", "pytorch", "training"],
        "editable": True, "graphTooltip": 1, "refresh": "30s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "timepicker": {}, "timezone": "",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            variable("experiment", "Experiment", "label_values(kubetrain_info, experiment)", multi=False),
            variable("rank", "Rank", 'label_values(kubetrain_info{experiment="$experiment"}, rank)', multi=True),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.name} is stale: run python tools/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
