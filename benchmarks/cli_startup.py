"""Start-up of the controller verbs, whole process, against the interpreter's own start.

Each verb runs as a user types it (`python -m trainer.controller.cli ...`, what
the `kubetrain` script runs); the baseline is `python -c pass` with the same
interpreter and site-packages. Runs alternate (baseline, verb, baseline, ...)
so machine noise hits both alike; prints medians, the verb's cost over the bare
interpreter, and the goal (<= 0.5 s per verb). `render` and `submit` run the
chart with helm (KUBETRAIN_HELM or PATH), so their time includes helm's.

    python benchmarks/cli_startup.py [--repeats 7]

`submit`, `status`, `logs`, `list` and `delete` run against a real
kube-apiserver on loopback when $KUBEBUILDER_ASSETS holds one
(scripts/install-test-tools.sh builds it); otherwise only `render` and
`--help` are timed, and the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
GOAL_S = 0.5
QUICK = ["-f", str(REPO / "examples" / "quickstart.yaml")]


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


@contextlib.contextmanager
def cluster_or_none():
    """A real API server (yields its kubectl-style flags and a namespace), or None with the reason."""
    import pytest

    from kube_control_plane import apiserver_on_loopback

    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as work:
        try:
            with apiserver_on_loopback(Path(work)) as cluster:
                cluster.kubectl("create", "namespace", "bench")
                yield ["--kubeconfig", str(cluster.kubeconfig), "-n", "bench"]
        except pytest.skip.Exception as skipped:
            print(f"(no API server: {skipped.msg}; cluster verbs not timed)")
            yield None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "trainer.controller.cli"]
    with cluster_or_none() as target:
        verbs = {"--help": ["--help"], "render": ["render", "exp", *QUICK], "status --help": ["status", "--help"]}
        if target:
            subprocess.run([*cli, "submit", "exp", *QUICK, *target], check=True, capture_output=True)
            verbs.update({
                "submit (no change)": ["submit", "exp", *QUICK, *target],
                "submit --dry-run": ["submit", "exp-dry", *QUICK, "--dry-run", *target],
                "status": ["status", "exp", *target],
                "logs (no pods)": ["logs", "exp", "--wait-seconds", "0", *target],
                "list": ["list", *target],
                "delete": ["delete", "gone", *target],
            })
        baseline, times = [], {name: [] for name in verbs}
        for _ in range(args.repeats):
            for name, verb in verbs.items():
                if name == "delete":  # something to delete, submitted outside the timing
                    subprocess.run([*cli, "submit", "gone", *QUICK, *target], check=True, capture_output=True)
                baseline.append(wall([sys.executable, "-c", "pass"]))
                times[name].append(wall([*cli, *verb]))
    base = statistics.median(baseline)
    print(f"{'verb':>20} {'median s':>9} {'over python -c pass':>20} {'goal <= 0.5 s over':>19}")
    print(f"{'python -c pass':>20} {base:>9.3f}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:>20} {median:>9.3f} {median - base:>+19.3f}s "
              f"{'met' if median - base <= GOAL_S else 'MISSED':>19}")
    print(f"({args.repeats} alternating repeats, whole process)")


if __name__ == "__main__":
    main()
