"""Without helm: render and submit say what to install in one line; `kubetrain run` needs no helm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from support import EXAMPLES, FAST_TRAINING, run_cli

QUICK = ["-f", str(EXAMPLES / "quickstart.yaml")]


@pytest.fixture
def no_helm(tmp_path) -> dict:
    """An environment whose PATH holds this Python and nothing named helm, and no KUBETRAIN_HELM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    for entry in path.split(os.pathsep):
        assert not Path(entry, "helm").exists(), f"{entry} has a helm: this test cannot hide it"
    return {"PATH": path, "KUBETRAIN_HELM": ""}


@pytest.mark.parametrize("verb", ["render", "submit"])
def test_render_and_submit_without_helm_say_what_to_install(no_helm, verb, tmp_path):
    result = run_cli(verb, "quickstart", *QUICK, env={**no_helm, "KUBECONFIG": str(tmp_path / "none")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"Error: kubetrain {verb} runs the chart with helm: helm is not on PATH; "
                             "install helm 3.17 or newer (or set KUBETRAIN_HELM to its path)\n")


def test_a_kubetrain_helm_that_is_not_there_is_named(no_helm):
    result = run_cli("render", "quickstart", *QUICK, env={**no_helm, "KUBETRAIN_HELM": "/nowhere/helm"})
    assert result.returncode == 2 and "KUBETRAIN_HELM=/nowhere/helm is not an executable" in result.stderr
    assert result.stderr.count("\n") == 1


def test_an_old_helm_is_refused_with_its_version(no_helm, tmp_path):
    old = tmp_path / "helm"
    old.write_text("#!/bin/sh\necho v3.12.0\n")
    old.chmod(0o755)
    result = run_cli("render", "quickstart", *QUICK, env={**no_helm, "KUBETRAIN_HELM": str(old)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"Error: kubetrain render needs helm 3.17 or newer; {old} is v3.12.0\n"


def test_bad_values_are_refused_before_helm_is_looked_for(no_helm):
    result = run_cli("render", "quickstart", *QUICK, "--set", "job.nodes=0", env=no_helm)
    assert result.returncode == 2 and "job.nodes: 0 is less than the minimum of 1" in result.stderr


def test_run_trains_with_helm_absent_from_path(no_helm, tmp_path):
    result = run_cli("run", "no-helm", *QUICK, "--workdir", str(tmp_path), *FAST_TRAINING,
                     "--set", "training.maxSteps=4,metrics.enabled=false", env=no_helm)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert result.summary["status"] == "succeeded" and result.summary["steps"] == 4
