"""The chart's Prometheus alert rules: valid, unit-tested with promtool, about real metrics."""

from __future__ import annotations

import subprocess

import yaml

from support import REPO, tool
from test_dashboard import metric_names

RULES = REPO / "helm" / "kubetrain" / "files" / "alert-rules.yaml"
UNIT_TESTS = REPO / "tests" / "alerts" / "alert-rules_test.yaml"
EXPERIMENT = "demo"  # what tests/alerts/ expects in place of __EXPERIMENT__


def goodput_below() -> float:
    """metrics.prometheusRule.goodputBelow's default (the chart's values.yaml, generated from the model)."""
    values = yaml.safe_load((REPO / "helm" / "kubetrain" / "values.yaml").read_text())
    return values["metrics"]["prometheusRule"]["goodputBelow"]


def rendered_rules(experiment: str = EXPERIMENT) -> str:
    """What the chart renders: the release name and the thresholds from values in place of the tokens."""
    return RULES.read_text().replace("__EXPERIMENT__", experiment).replace("__GOODPUT_BELOW__",
                                                                          str(goodput_below()))


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(rendered_rules())["groups"] for rule in group["rules"]]


def test_promtool_check_rules_is_clean(tmp_path):
    promtool = tool("KUBETRAIN_PROMTOOL", "promtool")
    (tmp_path / "alert-rules.yaml").write_text(rendered_rules("my-experiment"))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "alert-rules.yaml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in check.stdout


def test_promtool_unit_tests_pass(tmp_path):
    promtool = tool("KUBETRAIN_PROMTOOL", "promtool")
    (tmp_path / "alert-rules.yaml").write_text(rendered_rules())
    (tmp_path / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    run = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_unit_tested_both_ways():
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in alerts():
        mine = [c for c in cases if c["alertname"] == alert["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{alert['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert['alert']}: no case where it stays silent"


def test_rules_are_scoped_to_the_experiment_and_annotated():
    wanted = {"KubetrainHeartbeatStalled", "KubetrainLossNotFinite", "KubetrainThroughputDrop",
              "KubetrainMFUDrop", "KubetrainCheckpointFailing", "KubetrainRestarted", "KubetrainLowGoodput"}
    assert {a["alert"] for a in alerts()} == wanted
    raw = yaml.safe_load(RULES.read_text())
    for rule in raw["groups"][0]["rules"]:
        assert 'experiment="__EXPERIMENT__"' in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])


def test_alerts_name_only_metrics_the_trainer_exports(live_run):
    exported = live_run.metric_names()
    for alert in alerts():
        names = metric_names(alert["expr"])
        assert names and names <= exported, f"{alert['alert']}: {sorted(names - exported)} not exported"


def test_the_low_goodput_threshold_comes_from_values(values_file):
    """The chart fills metrics.prometheusRule.goodputBelow into the rule (the unit tests use the default)."""
    from support import helm_objects

    assert goodput_below() == 0.5  # what tests/alerts/ expects

    def rule(*files):
        rules = next(o for o in helm_objects("demo", files=files) if o["kind"] == "PrometheusRule")
        return next(r for g in rules["spec"]["groups"] for r in g["rules"] if r["alert"] == "KubetrainLowGoodput")

    on = {"metrics": {"prometheusRule": {"enabled": True}}}
    assert rule(values_file(on))["expr"].strip().endswith("< 0.5")
    lower = values_file({"metrics": {"prometheusRule": {"enabled": True, "goodputBelow": 0.25}}})
    assert rule(lower)["expr"].strip() == 'min by (experiment) (kubetrain_goodput_ratio{experiment="demo"}) < 0.25'
