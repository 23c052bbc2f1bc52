"""Shared test helpers: run the real `kubetrain` CLI and trainer as processes.

Tests import these with `from support import ...` (not from conftest: tests/cluster
has a conftest of its own, and two modules named `conftest` collide).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        """The last stdout line: the JSON summary every run ends with."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        assert lines, f"no output; stderr:\n{self.stderr}"
        return json.loads(lines[-1])


def tool(env_var: str, name: str) -> str:
    """A test tool's executable: $env_var (set by scripts/install-test-tools.sh), else PATH; skips if absent."""
    for path in (os.environ.get(env_var), shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip(f"{name} not found: set {env_var} or put it on PATH "
                '(run: eval "$(bash scripts/install-test-tools.sh)")')


def helm_objects(name: str, files=(), sets=(), include_tests: bool = True) -> list[dict]:
    """What `kubetrain render` renders, as objects: the chart run by the real helm (skips without it)."""
    from trainer.controller.helm import ValueFlags, manifests, template

    tool("KUBETRAIN_HELM", "helm")
    return manifests(template(name, ValueFlags(files=tuple(str(f) for f in files), sets=tuple(sets)), include_tests))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            python: tuple[str, ...] = (), module: str = "trainer.controller.cli") -> Result:
    """Run `kubetrain ARGS` in a fresh interpreter, as a user would (`python PYTHON -m MODULE ARGS`)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, *python, "-m", module, *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# What the controller verbs must never load: the trainer's stack, which costs seconds of start-up.
HEAVY_MODULES = frozenset({"torch", "numpy", "transformers", "datasets", "tokenizers", "safetensors",
                           "boto3", "botocore", "prometheus_client", "pandas", "pyarrow",
                           "kubernetes", "urllib3", "requests"})


def heavy_imports(*args: str, module: str = "trainer.controller.cli") -> tuple[Result, set[str]]:
    """Run `kubetrain ARGS` (or `python -m MODULE ARGS`) under `python -X importtime`;
    the heavy top-level packages it imported."""
    result = run_cli(*args, python=("-X", "importtime"), module=module, timeout=120)
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    result.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return result, imported & HEAVY_MODULES


@pytest.fixture
def values_file(tmp_path):  # re-exported by tests/conftest.py
    """Write a values mapping to a YAML file and return its path."""
    counter = iter(range(1000))

    def write(values: dict, name: str | None = None) -> Path:
        path = tmp_path / (name or f"values-{next(counter)}.yaml")
        path.write_text(yaml.safe_dump(values))
        return path

    return write


# Small, fast settings for training tests on 2 shared CPU cores.
FAST_TRAINING = [
    "--set", "training.data.trainSamples=2048,training.data.evalSamples=512",
    "--set", "training.batchSize=32,training.logEverySteps=8",
]


def start_run(tmp_path, *extra: str) -> subprocess.Popen:
    """A long `kubetrain run` in the background, for tests that signal or kill its replicas."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "run", "longrun", "--workdir", str(tmp_path),
         *FAST_TRAINING, "--set", "training.epochs=200,metrics.enabled=false", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> tuple[re.Match, list[str]]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m, lines
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}:\n" + "".join(lines[-40:]))


def finish(proc: subprocess.Popen, lines: list[str]) -> Result:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # replicas die with the runner (PDEATHSIG)
    return Result(proc.returncode, "".join(lines) + out, err)
