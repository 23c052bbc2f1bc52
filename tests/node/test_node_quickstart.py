"""`helm install` of the quickstart on a real node: the operator's pods train with gloo and succeed.

One release in the dev stack's own namespace (k8s/namespace.yaml, Pod Security
`restricted` enforced), scraped by a real Prometheus that finds the pods through
Kubernetes pod discovery with the selection the chart's PodMonitor makes.
"""

from __future__ import annotations

import datetime
import json
import re
import time

import pytest
import yaml

from kube_node import NODE_IP
from nodejobs import QUICKSTART, get_json, helm, job_pods, kt, tier_values, wait_for_state
from prometheus_server import query
from support import REPO
from trainer.controller.local import operator_env

# The first test also waits for the node to start (a cold image import takes minutes).
pytestmark = pytest.mark.timeout(1200)


NAMESPACE = "kubetrain"  # k8s/namespace.yaml
PROMETHEUS_PORT = 9090
MONITORING = ["--set", "metrics.podMonitor.enabled=true,metrics.podMonitor.interval=1s"]


def podmonitor_scrape_config(podmonitor: dict, kubeconfig: str) -> dict:
    """The scrape job prometheus-operator generates for a PodMonitor (selector, port, phase, labels)."""
    spec, meta = podmonitor["spec"], podmonitor["metadata"]
    endpoint = spec["podMetricsEndpoints"][0]
    relabel = [{"action": "keep", "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(k)}"], "regex": v}
               for k, v in spec["selector"]["matchLabels"].items()]
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"]},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    relabel += [{"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(k)}"], "target_label": _sanitize(k)}
                for k in spec.get("podTargetLabels", [])]
    return {"job_name": f"podMonitor/{meta.get('namespace', NAMESPACE)}/{meta['name']}/0",
            "scrape_interval": endpoint["interval"], "scrape_timeout": endpoint["interval"],
            "metrics_path": endpoint["path"], "honor_labels": False,
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": kubeconfig,
                                       "namespaces": {"names": [NAMESPACE]}}],
            "relabel_configs": relabel}


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


@pytest.fixture(scope="module")
def quickstart(node, tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    node.cluster.kubectl("apply", "--server-side", "-f", str(REPO / "k8s" / "namespace.yaml"))
    values = ["-f", str(QUICKSTART), *tier_values(), *MONITORING]
    rendered = helm(node, "template", "quickstart", "helm/kubetrain", "-n", NAMESPACE, *values)
    assert rendered.returncode == 0, rendered.stderr
    podmonitor = next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "PodMonitor")
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [podmonitor_scrape_config(podmonitor, str(node.inner_kubeconfig))]}))
    # Built by tests/node/build-node-assets.sh: Debian's Prometheus has no Kubernetes discovery.
    prometheus = node.spawn("prometheus", [
        node.assets.node / "prometheus", f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}"])
    try:
        started, installed_at = time.monotonic(), time.time()
        installed = helm(node, "install", "quickstart", "helm/kubetrain", "-n", NAMESPACE, *values)
        assert installed.returncode == 0, installed.stderr
        job = wait_for_state(node, NAMESPACE, "quickstart", {"Succeeded", "Failed"})
        yield {"job": job, "pods": job_pods(node, NAMESPACE, "quickstart"), "podmonitor": podmonitor,
               "prometheus": f"http://{NODE_IP}:{PROMETHEUS_PORT}", "seconds": time.monotonic() - started,
               "ended": time.time(), "installed_at": installed_at}
    finally:
        helm(node, "uninstall", "quickstart", "-n", NAMESPACE)
        prometheus.stop()
        node.cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_helm_install_quickstart_trains_to_succeeded(node, quickstart):
    from trainer.controller.jobs import job_state

    assert job_state(quickstart["job"]) == "Succeeded", json.dumps(quickstart["job"].get("status"))
    status = kt(node, NAMESPACE, "status", "quickstart")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "State:      Succeeded" in status.stdout
    assert "[master-0]" in status.stdout and "[worker-1]" in status.stdout
    logs = kt(node, NAMESPACE, "logs", "quickstart")
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert any(ln.startswith("[master-0] ") and " loss " in ln for ln in lines), logs.stdout
    assert any(ln.startswith("[worker-1] ") and "rank=1" in ln for ln in lines), logs.stdout
    summary = json.loads(next(ln for ln in reversed(logs.stdout.splitlines())
                              if ln.startswith("[master-0] {"))[len("[master-0] "):])
    assert summary["status"] == "succeeded" and summary["world_size"] == 2 and summary["steps"] == 384
    assert summary["train_loss"] < summary["first_train_loss"] / 2, summary
    assert summary["eval_accuracy"] > 0.5, summary
    print(f"quickstart: Succeeded {quickstart['seconds']:.0f}s after helm install; loss "
          f"{summary['first_train_loss']:.3f} -> {summary['train_loss']:.3f}, eval accuracy {summary['eval_accuracy']}")


def _k8s_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_apply_to_first_step_breaks_down_into_its_phases(node, quickstart):
    """From `helm install` to rank 0's first step: the API server and operator (pod created), the
    scheduler, the init container, the container start, then the trainer's own start-up line. Kubernetes
    timestamps have whole seconds, so each phase is good to about a second."""
    master = next(p for p in quickstart["pods"] if p["metadata"]["name"].endswith("-master-0"))
    status = master["status"]
    scheduled = next(c for c in status["conditions"] if c["type"] == "PodScheduled")["lastTransitionTime"]
    init = [s["state"]["terminated"] for s in status.get("initContainerStatuses") or []]
    trainer = next(s for s in status["containerStatuses"] if s["name"] == "pytorch")
    started = (trainer["state"].get("terminated") or trainer["state"].get("running"))["startedAt"]
    points = [("helm install -> pod created (helm, API server, operator)", _k8s_time(master["metadata"]
                                                                                        ["creationTimestamp"])),
              ("pod created -> scheduled", _k8s_time(scheduled))]
    if init:
        points.append(("scheduled -> init container done", max(_k8s_time(t["finishedAt"]) for t in init)))
    points.append(("-> trainer container started", _k8s_time(started)))
    logs = kt(node, NAMESPACE, "logs", "quickstart", "--rank", "0").stdout
    line = re.search(r"start-up: (.*); ([0-9.]+)s from process start", logs)
    assert line, logs[-2000:]
    phases = {name.strip(): float(v) for name, v in re.findall(r"([a-z ]+?) ([0-9.]+)s", line.group(1))}
    total = points[-1][1] - quickstart["installed_at"] + float(line.group(2))
    print(f"\nquickstart, helm install -> rank 0's first step: {total:.1f}s")
    previous = quickstart["installed_at"]
    for name, at in points:
        print(f"  {name:<58} {at - previous:6.1f}s")
        assert at - previous > -1.5, (name, at, previous)  # whole-second stamps: ordered to within a second
        previous = at
    for name, seconds in phases.items():
        print(f"  container: {name:<47} {seconds:6.2f}s")
    # Rank 0's rendezvous waits for rank 1: the Worker pod's own timeline, from helm install.
    worker = next(p for p in quickstart["pods"] if "-worker-" in p["metadata"]["name"])
    marks = [("created", worker["metadata"]["creationTimestamp"])]
    marks += [(f"init container {s['name']} done", s["state"]["terminated"]["finishedAt"])
              for s in worker["status"].get("initContainerStatuses") or []]
    marks += [("trainer container started", (s["state"].get("terminated") or s["state"].get("running"))["startedAt"])
              for s in worker["status"]["containerStatuses"] if s["name"] == "pytorch"]
    print("  worker pod, from helm install: " + ", ".join(
        f"{name} {_k8s_time(at) - quickstart['installed_at']:.1f}s" for name, at in marks))
    assert abs(sum(phases.values()) - float(line.group(2))) < 0.1, line.group(0)
    assert 0 < total < quickstart["seconds"]


def test_operator_gives_the_pods_the_env_kubetrain_run_injects(node, quickstart):
    """The rank contract, read from the pods the real operator made, against the local runner's env."""
    logs = kt(node, NAMESPACE, "logs", "quickstart").stdout
    for pod in quickstart["pods"]:
        index = int(pod["metadata"]["labels"]["training.kubeflow.org/replica-index"])
        kind = pod["metadata"]["labels"]["training.kubeflow.org/replica-type"]
        rank = index if kind == "master" else index + 1
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
        given = {e["name"]: e.get("value") for e in container.get("env", []) if "value" in e}
        local = operator_env(rank, nodes=2, nproc=1, port=23456)
        local.update(MASTER_ADDR="quickstart-master-0", PET_MASTER_ADDR="quickstart-master-0")  # locally 127.0.0.1
        assert {k: given.get(k) for k in local} == local, (pod["metadata"]["name"], given)
    # ... and the running processes read it so: rank 0's table, one row gathered from each rank.
    table = logs[logs.index("rank table: "):].splitlines()
    assert "launcher=pytorchjob world_size=2 nnodes=2 nproc_per_node=1" in table[0], table[0]
    assert "master=quickstart-master-0:23456" in table[0], table[0]
    rows = [ln.split()[1:] for ln in table[2:4]]  # [master-0] rank local node replica host pid device threads
    assert [(r[0], r[3], r[4], r[-1]) for r in rows] == [
        ("0", "master-0", "quickstart-master-0", "1"), ("1", "worker-1", "quickstart-worker-0", "1")], table[:4]


def test_restricted_namespace_admits_guaranteed_pods_with_our_init_container(node, quickstart):
    labels = get_json(node, NAMESPACE, "namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = {p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p for p in quickstart["pods"]}
    assert set(pods) == {"master", "worker"}
    assert {p["status"]["qosClass"] for p in pods.values()} == {"Guaranteed"}
    init = pods["worker"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["init-pytorch"], init
    assert init[0]["securityContext"]["runAsNonRoot"] and init[0]["resources"]["requests"] == \
        init[0]["resources"]["limits"]
    waited = node.cluster.kubectl("logs", pods["worker"]["metadata"]["name"], "-n", NAMESPACE,
                                  "-c", "init-pytorch").stdout
    assert "quickstart-master-0 resolves" in waited, waited


def test_prometheus_pod_discovery_scrapes_both_ranks(node, quickstart):
    at = {"time": quickstart["ended"]}  # the pods are gone: ask about the run, with its samples in range
    steps = query(quickstart["prometheus"],
                  'max by (rank) (max_over_time(kubetrain_steps_total{experiment="quickstart"}[10m]))', **at)
    result = {r["metric"]["rank"]: float(r["value"][1]) for r in steps}
    assert set(result) == {"0", "1"} and min(result.values()) > 0, steps
    pods = query(quickstart["prometheus"],
                 "count by (pod, training_kubeflow_org_replica_type) (max_over_time(kubetrain_info[10m]))", **at)
    # The PodMonitor's podTargetLabels and the pod name ride along, as prometheus-operator adds them.
    assert {(p["metric"]["pod"], p["metric"]["training_kubeflow_org_replica_type"]) for p in pods} == {
        ("quickstart-master-0", "master"), ("quickstart-worker-0", "worker")}, pods


def test_helm_test_passes_on_the_node(node, quickstart):
    # (No --logs: the hook's delete policy removes the succeeded pod before helm could read them.)
    tested = helm(node, "test", "quickstart", "-n", NAMESPACE, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "TEST SUITE:     quickstart-test" in tested.stdout and "Phase:          Succeeded" in tested.stdout
