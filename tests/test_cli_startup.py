"""The controller verbs start fast because they never import the trainer's stack.

`render` and every verb's `--help` run here; `submit`, `status`, `logs`, `list`
and `delete` run against a real kube-apiserver in
tests/cluster/test_controller_cluster.py. `benchmarks/cli_startup.py` times them.
"""

from __future__ import annotations

import pytest

from support import EXAMPLES, heavy_imports

VERBS = ("run", "render", "submit", "status", "logs", "list", "delete")


def test_render_imports_nothing_heavy():
    result, heavy = heavy_imports("render", "exp", "-f", str(EXAMPLES / "quickstart.yaml"))
    assert result.returncode == 0, result.stderr
    assert "kind: PyTorchJob" in result.stdout
    assert not heavy, f"kubetrain render imported {sorted(heavy)}"


@pytest.mark.parametrize("args", [["--help"], *([verb, "--help"] for verb in VERBS)], ids=" ".join)
def test_help_imports_nothing_heavy(args):
    result, heavy = heavy_imports(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: kubetrain" in result.stdout
    assert not heavy, f"kubetrain {' '.join(args)} imported {sorted(heavy)}"


def test_the_check_sees_a_heavy_import():
    """The control: the pod's launcher (torchrun's wrapper) does load torch, and is caught."""
    result, heavy = heavy_imports("--help", module="trainer.worker.launch")
    assert result.returncode == 0, result.stderr
    assert "torch" in heavy
