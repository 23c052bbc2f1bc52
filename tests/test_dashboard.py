"""The Grafana dashboard: generated, parseable PromQL, and only metrics that really exist."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess

import pytest
import yaml

from support import REPO, run_cli, tool

DASHBOARD = REPO / "helm" / "kubetrain" / "files" / "dashboard.json"
GENERATOR = REPO / "tools" / "gen_dashboard.py"
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL"}
# Grafana variables, as Grafana would substitute them for one experiment and all ranks.
GRAFANA_VARIABLES = {"$experiment": "metrics-demo", "$rank": ".*", "$__rate_interval": "5s"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "sum", "avg", "min", "max", "count", "group", "topk", "bottomk", "quantile", "stddev", "stdvar",
    "rate", "irate", "increase", "histogram_quantile", "time", "abs", "clamp_min", "clamp_max",
    "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "label_values", "Inf", "NaN",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict) -> list[tuple[str, str]]:
    return [(panel["title"], t["expr"]) for panel in board["panels"] for t in panel.get("targets", [])]


def substitute(expr: str, **variables: str) -> str:
    values = {**GRAFANA_VARIABLES, **{f"${k}": v for k, v in variables.items()}}
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are no label, function or keyword."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\b[a-zA-Z_][\w:]*\s*\(", "(", expr)  # function and aggregator calls
    return {name for name in re.findall(r"\b[a-zA-Z_:][\w:]*", expr) if name not in PROMQL_WORDS}


def test_committed_dashboard_is_the_generator_output():
    spec = importlib.util.spec_from_file_location("gen_dashboard", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert DASHBOARD.read_text() == generator.render(), "run python tools/gen_dashboard.py"


def test_dashboard_has_the_variables_and_panels_users_look_for():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "experiment", "rank"} <= set(variables)
    assert variables["rank"]["multi"] and variables["rank"]["includeAll"]
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for wanted in ("loss", "accuracy", "samples/s per rank and total", "step time p50 / p95", "data wait",
                   "checkpoint save / load duration", "gpu memory", "gpu utilisation", "goodput"):
        assert wanted in titles, wanted
    queries = dict(panel_queries(board))
    for title, expr in panel_queries(board):
        if "DCGM" not in expr:
            assert '"$experiment"' in expr and '"$rank"' in expr, f"{title}: not scoped by the variables"
    assert re.search(r"DCGM_FI_DEV_GPU_UTIL \* on \(pod\) group_left", queries["GPU utilisation (DCGM)"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_says_what_it_shows_and_rates_follow_the_scrape_interval():
    board = dashboard()
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert len(panel.get("description", "")) > 20, f"{panel['title']}: no description"
    for title, expr in panel_queries(board):
        for window in re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
            # A fixed window only where the panel says so (checkpoints are minutes apart).
            assert window == "$__rate_interval" or window in title, f"{title}: rate over [{window}]"


def test_every_panel_query_parses_as_a_recording_rule(tmp_path):
    promtool = tool("KUBETRAIN_PROMTOOL", "promtool")
    rules = [{"record": f"dashboard:panel_{i}", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(panel_queries(dashboard()))]
    for variable in dashboard()["templating"]["list"]:  # label_values(SELECTOR, label): the selector
        match = re.fullmatch(r"label_values\((.+), *\w+\)", variable.get("definition", ""))
        if match:
            rules.append({"record": f"dashboard:variable_{variable['name']}", "expr": substitute(match[1])})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout


def test_dashboard_names_only_exported_or_dcgm_metrics(live_run):
    exported = live_run.metric_names()
    assert "kubetrain_steps_total" in exported
    for title, expr in panel_queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric found in {expr}"
        unknown = names - exported - DCGM_METRICS
        assert not unknown, f"{title}: {sorted(unknown)} is neither exported by the trainer nor by DCGM"


@pytest.mark.parametrize("title", ["Loss", "Eval accuracy", "Samples/s per rank and total", "Step time p50 / p95",
                                   "Data wait (share of step time)", "Gradient norm",
                                   "Last committed checkpoint step", "MFU per rank", "Goodput per rank",
                                   "Where the experiment's time went"])
def test_core_panels_show_data_from_the_real_run(live_run, title):
    queries = [expr for t, expr in panel_queries(dashboard()) if t == title]
    when = live_run.last_scrape_time()
    for expr in queries:
        result = live_run.prometheus.query(substitute(expr), time=when)
        assert result, f"{title}: {expr} returned no data for the run"


def test_token_panel_shows_data_from_the_real_token_run(live_run):
    from prometheus_server import TOKENS_EXPERIMENT

    queries = [expr for t, expr in panel_queries(dashboard()) if t == "Tokens/s per rank and total"]
    assert queries
    when = live_run.last_tokens_scrape_time()
    for expr in queries:
        result = live_run.prometheus.query(substitute(expr, experiment=TOKENS_EXPERIMENT), time=when)
        assert result and max(float(r["value"][1]) for r in result) > 0, f"{expr} returned {result}"


@pytest.mark.parametrize("renderer", ["kubetrain", "helm"])
def test_two_releases_get_two_dashboards_in_one_grafana(renderer):
    """Grafana keys dashboards by uid: one per experiment, or the second release replaces the first."""
    boards = {}
    for release in ("exp-a", "exp-b-" + "x" * 47):  # the longest name a release may have (53)
        if renderer == "helm":
            out = subprocess.run([tool("KUBETRAIN_HELM", "helm"), "template", release, str(REPO / "helm" / "kubetrain")],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            text = out.stdout
        else:
            result = run_cli("render", release)
            assert result.returncode == 0, result.stderr
            text = result.stdout
        (cm,) = [d for d in yaml.safe_load_all(text) if d and d["metadata"]["name"] == f"{release}-dashboard"]
        boards[release] = json.loads(cm["data"][f"kubetrain-{release}.json"])
    uids = {b["uid"] for b in boards.values()}
    assert len(uids) == 2 and all(len(u) <= 40 for u in uids), uids  # Grafana's limit on a uid
    assert [b["title"] for b in boards.values()] == [f"kubetrain: {r}" for r in boards]
