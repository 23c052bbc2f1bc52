"""The kind walk-through end to end (tests/e2e/run_kind.sh), where Docker and kind exist.

Elsewhere (this project's development machines and CI have no Docker engine)
it skips with the reason the script gives.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "run_kind.sh"


def _missing() -> str | None:
    if not shutil.which("docker"):
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker engine answers (docker info failed)"
    if not shutil.which("kind"):
        return "kind is not installed"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quickstart_on_kind():
    reason = _missing()
    if reason:
        pytest.skip(f"kind e2e: {reason}")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    if proc.returncode == 0 and proc.stdout.startswith("SKIP:"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "[e2e] PASSED" in proc.stderr
