"""The controller against a real kube-apiserver as the namespace fills: `list` and `status`.

Starts etcd and kube-apiserver on loopback with the real CRDs (the cluster
tier's, from $KUBEBUILDER_ASSETS) and grows one namespace to 50, then 500
experiments: each a PyTorchJob from `kubetrain render` plus the two pods the
operator would make for it (Pending: no kubelet runs here). At each size it
times `kubetrain list` and `kubetrain status exp-0` as whole processes
(median of N alternating runs), with the client's CPU time, and prints how each
grows from 50 to 500. Goals: `list` <= 1 s at 500; `status` does not grow with
other experiments' pods.

    python benchmarks/control_plane.py [--sizes 50,500] [--repeats 5]

`logs --follow` over 16 pods needs kubelets: benchmarks/logs_follow.py runs
it on the node tier.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
CLI = [sys.executable, "-m", "trainer.controller.cli"]
NAMESPACE = "bench"
LIST_GOAL_S = 1.0


def template_job() -> dict:
    rendered = subprocess.run([*CLI, "render", "exp-template", "-f", str(REPO / "examples" / "quickstart.yaml")],
                              cwd=REPO, check=True, capture_output=True, text=True).stdout
    return next(d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "PyTorchJob")


def experiment(job: dict, name: str) -> list[dict]:
    """A PyTorchJob named `name` and its master and worker pods, as the operator labels them."""
    job = copy.deepcopy(job)
    job["metadata"]["name"] = name
    job["metadata"]["namespace"] = NAMESPACE
    job["metadata"]["labels"]["app.kubernetes.io/instance"] = name
    job["metadata"]["labels"]["kubetrain.io/experiment"] = name
    pods = []
    for replica, index in (("master", 0), ("worker", 0)):
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-{replica}-{index}", "namespace": NAMESPACE,
            "labels": {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": replica,
                       "training.kubeflow.org/replica-index": str(index)}},
            "spec": {"containers": [{"name": "pytorch", "image": "kubetrain/trainer:bench"}]}})
    return [job, *pods]


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, client CPU seconds, stdout) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         timeout=300).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def create_experiments(cluster, objects_of, first: int, last: int, batch: int = 50) -> None:
    """`kubectl create` experiments first..last-1 (`objects_of(i)` gives each one's objects), `batch` at a time."""
    for start in range(first, last, batch):
        items = [o for i in range(start, min(last, start + batch)) for o in objects_of(i)]
        cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from kube_control_plane import apiserver_on_loopback

    job = template_job()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as work, \
            apiserver_on_loopback(Path(work)) as cluster:
        cluster.kubectl("create", "namespace", NAMESPACE)
        target = ["--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE]
        made = 0
        for size in sizes:
            create_experiments(cluster, lambda i: experiment(job, f"exp-{i}"), made, size)
            made = max(made, size)
            verbs = {"list": ["list", *target], "status exp-0": ["status", "exp-0", *target]}
            samples = {name: [] for name in verbs}
            for _ in range(args.repeats):
                for name, argv in verbs.items():
                    samples[name].append(timed([*CLI, *argv]))
            results[size] = {name: (statistics.median(w for w, _, _ in s), statistics.median(c for _, c, _ in s))
                             for name, s in samples.items()}
            listed = samples["list"][-1][2]
            print(f"{size} experiments ({2 * size} pods): list printed {len(listed.splitlines()) - 1} rows",
                  flush=True)
    print(f"\n{'verb':>14} {'experiments':>12} {'wall s':>7} {'client CPU s':>13}")
    for size, verbs in results.items():
        for name, (wall, cpu) in verbs.items():
            print(f"{name:>14} {size:>12} {wall:>7.3f} {cpu:>13.3f}")
    first, last = sizes[0], sizes[-1]
    print(f"\ngrowth {first} -> {last} experiments ({last / first:.0f}x):")
    for name in results[first]:
        print(f"  {name:>14}: wall {results[last][name][0] / results[first][name][0]:.2f}x, "
              f"CPU {results[last][name][1] / results[first][name][1]:.2f}x")
    at_last = results[last]["list"][0]
    print(f"  list at {last}: {at_last:.3f} s ({'met' if at_last <= LIST_GOAL_S else 'MISSED'}: goal <= "
          f"{LIST_GOAL_S:.0f} s)")
    print(f"(medians of {args.repeats} alternating runs, whole process)")


if __name__ == "__main__":
    import pytest  # the control plane helpers report missing assets as a pytest skip

    try:
        main()
    except (pytest.skip.Exception, pytest.fail.Exception) as missing:
        sys.exit(f"control_plane: no API server to measure: {missing.msg}")
