"""`kubetrain logs --follow` over 16 pods on a real node, against `kubectl logs -f -l ... --prefix`.

Starts the node tier (tests/kube_node.py: kube-apiserver, kubelet, containerd,
the training operator; `eval "$(bash scripts/install-test-tools.sh)"` first, as
root). An experiment's PyTorchJob is created suspended, so the operator makes no
pods, and the benchmark creates its 16 pods itself with the operator's labels
(one Master, 15 Workers) running the trainer image. Each pod waits for a common
start time, then prints `--lines` lines 10 ms apart, each stamped with the
wall clock. Both clients follow all 16 pods from before the start; the
benchmark reads their output as it arrives and reports, per client: every line
received (and prefixed), the latency from a line's stamp to its arrival
(median, p99), and the client's CPU time. Once the lines are out, it also
times each client's snapshot (`kubetrain logs NAME`, `kubectl logs -l ...
--prefix`) as a whole process. Repeats alternate the clients, with fresh pods
each time.

To see whether a verb's cost grows with other experiments, the namespace is
first filled with `--others` experiments (a suspended PyTorchJob and its two
pods each, held unscheduled by a scheduling gate), growing from one size to the
next: 50, then 500 by default.

    python benchmarks/logs_follow.py [--pods 16] [--lines 500] [--repeats 5] [--others 50,500]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "node")]

from control_plane import create_experiments, timed  # noqa: E402 - the same helpers, one owner

NAMESPACE = "logs-bench"
PRINTER = ("import os, sys, time\n"
           "start = float(os.environ['START_AT'])\n"
           "time.sleep(max(0.0, start - time.time()))\n"
           "for i in range(int(os.environ['LINES'])):\n"
           "    print(f'line {i} at {time.time():.6f}', flush=True)\n"
           "    time.sleep(0.01)\n")


def job_and_pods(name: str, pods: int, lines: int, start_at: float, image: str) -> list[dict]:
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {"name": name, "namespace": NAMESPACE,
                        "labels": {"app.kubernetes.io/part-of": "kubetrain", "kubetrain.io/experiment": name}},
           "spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {
               role: {"replicas": count, "restartPolicy": "Never", "template": {"spec": {"containers": [
                   {"name": "pytorch", "image": image}]}}}
               for role, count in (("Master", 1), ("Worker", pods - 1))}}}
    objects = [job]
    for node in range(pods):
        role, index = ("master", 0) if node == 0 else ("worker", node - 1)
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-{role}-{index}", "namespace": NAMESPACE,
            "labels": {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": role,
                       "training.kubeflow.org/replica-index": str(index)}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "pytorch", "image": image, "imagePullPolicy": "Never",
                "command": ["python", "-c", PRINTER],
                "env": [{"name": "START_AT", "value": f"{start_at:.3f}"}, {"name": "LINES", "value": str(lines)}],
                "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}]}})
    return objects


def sizes_list(text: str) -> list[int]:
    """`50,500` -> [50, 500]: ascending counts >= 0 (the namespace only grows between rounds)."""
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if any(n < 0 for n in sizes) or sizes != sorted(sizes):
        raise argparse.ArgumentTypeError(f"want ascending counts >= 0, got {text!r}")
    return sizes


def other_experiment(name: str, image: str) -> list[dict]:
    """Another experiment's suspended job and its Master and Worker pods, gated so they stay Pending."""
    job, *pods = job_and_pods(name, 2, 0, 0.0, image)
    for pod in pods:
        pod["spec"]["schedulingGates"] = [{"name": "kubetrain.io/benchmark-never-schedule"}]
    return [job, *pods]


def follow(argv: list[str], env: dict, expected: int, timeout: float) -> dict:
    """Run a client, stamp each output line on arrival; returns latencies, lines per prefix and CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    latencies, per_pod = [], {}
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    deadline = time.time() + timeout
    for line in proc.stdout:
        now = time.time()
        prefix, _, rest = line.partition("] ")
        words = rest.split()
        if len(words) == 4 and words[0] == "line":
            latencies.append(now - float(words[3]))
            per_pod[prefix] = per_pod.get(prefix, 0) + 1
        if len(latencies) >= expected or now > deadline:
            break
    proc.terminate()
    proc.wait(timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"latencies": latencies, "per_pod": per_pod, "stderr": "".join(stderr)[-500:],
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=16)
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--others", default="50,500", type=sizes_list,
                        help="other experiments in the namespace, one size per round, ascending")
    args = parser.parse_args()
    import importlib.util

    from kube_node import Node, node_lock

    spec = importlib.util.spec_from_file_location("node_conftest", REPO / "tests" / "node" / "conftest.py")
    node_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_conftest)  # the node tier's own asset checks (tests/node/conftest.py)
    assets = node_conftest._find_assets()
    clients = ("kubetrain", "kubectl")
    results = {size: {c: [] for c in clients} for size in args.others}
    with node_lock(assets.cache), tempfile.TemporaryDirectory(prefix="kubetrain-logs-bench-") as tmp:
        node = Node(assets, Path(tmp)).start()
        try:
            kubectl = str(node.cluster.kubectl_path)
            node.cluster.kubectl("create", "namespace", NAMESPACE)
            env = {**os.environ, "KUBECONFIG": str(node.cluster.kubeconfig)}
            made = 0
            for size in args.others:
                create_experiments(node.cluster, lambda i: other_experiment(f"other-{i}", assets.trainer_image),
                                   made, size)
                made = size
                print(f"{size} other experiments ({2 * size} gated pods) in the namespace", flush=True)
                for i in range(args.repeats):
                    for client in (clients if i % 2 == 0 else clients[::-1]):
                        results[size][client].append(
                            one_run(node, kubectl, env, args, f"bench-{size}-{i}-{client}", client, i))
        finally:
            node.stop()
    report(args, results)


def one_run(node, kubectl: str, env: dict, args, name: str, client: str, i: int) -> dict:
    """Fresh pods for one client: follow them while they print, then time a snapshot."""
    start_at = time.time() + 30 + args.pods  # every pod running and followed by then
    node.cluster.apply(job_and_pods(name, args.pods, args.lines, start_at, node.assets.trainer_image))
    selector = f"training.kubeflow.org/job-name={name}"
    base = ([sys.executable, "-m", "trainer.controller.cli", "logs", name, "-n", NAMESPACE]
            if client == "kubetrain" else
            [kubectl, "logs", "-n", NAMESPACE, "-l", selector, "--prefix", "-c", "pytorch", "--tail=-1",
             f"--max-log-requests={args.pods}"])
    while time.time() < start_at - 10:  # kubectl -l only follows pods that exist and run
        running = json.loads(node.cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector,
                                                  "-o", "json").stdout)["items"]
        if sum(p["status"].get("phase") == "Running" for p in running) == args.pods:
            break
        time.sleep(1)
    outcome = follow([*base, "--follow" if client == "kubetrain" else "-f"], env, args.pods * args.lines,
                     timeout=start_at - time.time() + 120)
    got = len(outcome["latencies"])
    time.sleep(1)  # the last lines flushed to the kubelet's log files
    wall, cpu, printed = timed(base, env)
    outcome["snapshot"] = (wall, cpu, printed.count(" at "))
    print(f"  repeat {i + 1} {client:>9}: {got}/{args.pods * args.lines} lines from "
          f"{len(outcome['per_pod'])} pods, median latency "
          f"{1000 * statistics.median(outcome['latencies'] or [0]):.0f} ms, CPU {outcome['cpu']:.2f} s; "
          f"snapshot {outcome['snapshot'][0]:.2f} s, {outcome['snapshot'][2]} lines"
          + (f" ({outcome['stderr'].strip()})" if got < args.pods * args.lines else ""), flush=True)
    node.cluster.kubectl("delete", "pytorchjob", name, "-n", NAMESPACE, "--wait=false")
    node.cluster.kubectl("delete", "pods", "-l", selector, "-n", NAMESPACE, "--wait=false")
    return outcome


def report(args, results: dict) -> None:
    print(f"\n{args.pods} pods x {args.lines} lines (10 ms apart), medians of {args.repeats} runs each, alternating")
    print(f"{'others':>7} {'client':>10} {'lines':>7} {'median ms':>10} {'p99 ms':>8} {'follow CPU s':>13} "
          f"{'snapshot s':>11} {'snapshot CPU s':>15}")
    summary = {}
    for size, by_client in results.items():
        for client, runs in by_client.items():
            lat = sorted(x for r in runs for x in r["latencies"]) or [0.0]
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            row = summary[size, client] = {
                "cpu": statistics.median(r["cpu"] for r in runs),
                "snap": statistics.median(r["snapshot"][0] for r in runs),
                "snap_cpu": statistics.median(r["snapshot"][1] for r in runs)}
            print(f"{size:>7} {client:>10} {statistics.median(len(r['latencies']) for r in runs):>7.0f} "
                  f"{1000 * statistics.median(lat):>10.0f} {1000 * p99:>8.0f} {row['cpu']:>13.2f} "
                  f"{row['snap']:>11.3f} {row['snap_cpu']:>15.3f}")
    sizes = list(results)
    for size in sizes:
        ours, theirs = summary[size, "kubetrain"], summary[size, "kubectl"]
        print(f"with {size} others, kubetrain/kubectl: follow CPU {ours['cpu'] / theirs['cpu']:.2f}, "
              f"snapshot wall {ours['snap'] / theirs['snap']:.2f}")
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        print(f"growth {first} -> {last} other experiments:")
        for client in results[first]:
            a, b = summary[first, client], summary[last, client]
            print(f"  {client:>9}: follow CPU {b['cpu'] / a['cpu']:.2f}x, snapshot wall {b['snap'] / a['snap']:.2f}x, "
                  f"snapshot CPU {b['snap_cpu'] / a['snap_cpu']:.2f}x")


if __name__ == "__main__":
    import pytest  # the node tier's asset checks report what is missing as a pytest skip

    try:
        main()
    except (pytest.skip.Exception, pytest.fail.Exception) as missing:
        sys.exit(f"logs_follow: no node to measure on: {missing.msg}")
