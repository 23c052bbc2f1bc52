"""The walk-throughs of docs/tasks.md (fine-tuning your own model) and docs/llm.md (a language model from
a folder and a JSONL file to its export), run block by block as a user would paste them.

The blocks between `<!-- walkthrough` and `<!-- /walkthrough -->` run in order
in a scratch copy of the repository's examples: `bash` blocks with bash,
`python` blocks with this interpreter, a `yaml` block whose first line is
`# NAME` is written to NAME, `text` blocks are expected log lines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import REPO

DOC = REPO / "docs" / "tasks.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def walkthrough_blocks(doc: Path = DOC) -> list[tuple[str, str]]:
    text = doc.read_text()
    start, end = text.index("<!-- walkthrough"), text.index("<!-- /walkthrough -->")
    return BLOCK.findall(text[start:end])


def run_walkthrough(tmp_path: Path, doc: Path, kinds: list[str], run_command: str) -> tuple[str, str]:
    """Run the doc's blocks in order in a scratch folder with the examples; check that the block running
    `run_command` logged every line of the `text` block before it. Returns (that block's output, the
    last block's output)."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    blocks = walkthrough_blocks(doc)
    assert [kind for kind, _ in blocks] == kinds, blocks
    output, expected, run_log = "", [], ""
    for kind, body in blocks:
        if kind == "yaml":
            name = body.splitlines()[0].removeprefix("# ").strip()
            (tmp_path / name).write_text(body)
            continue
        if kind == "text":
            expected = body.strip().splitlines()
            continue
        argv = ["bash", "-euo", "pipefail", "-c", body] if kind == "bash" else [sys.executable, "-c", body]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{kind} block failed:\n{body}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        output = proc.stdout
        if run_command in body:
            run_log = proc.stdout
            for line in expected:  # the log lines the doc promises, with the path it elides
                pattern = re.escape(line).replace(re.escape("file://..."), "file://.*")
                assert re.search(pattern, run_log), f"no line like {line!r} in:\n{run_log[-4000:]}"
    assert run_log, f"no block runs {run_command!r}"
    return run_log, output


@pytest.mark.slow
def test_the_fine_tuning_walkthrough_runs_as_written(tmp_path):
    _, output = run_walkthrough(tmp_path, DOC, ["bash", "yaml", "bash", "text", "python"], "kubetrain run rings4")

    # The inference block printed the reloaded model's accuracy next to the run's own.
    match = re.search(r"accuracy ([\d.]+), the run said ([\d.]+)", output)
    assert match, output
    reloaded, reported = map(float, match.groups())
    print(f"walk-through: reloaded export accuracy {reloaded}, run's eval_accuracy {reported}")
    assert reloaded == reported and reloaded > 0.8

    # The frozen first layer left training as the 3-ring weights had it; the head is the new 4-way one.
    before = load_file(str(tmp_path / ".kubetrain/runs/rings/model/model.safetensors"))
    after = load_file(str(tmp_path / ".kubetrain/runs/rings4/model/model.safetensors"))
    assert after["blocks.0.0.weight"].equal(before["blocks.0.0.weight"])
    assert not after["blocks.1.0.weight"].equal(before["blocks.1.0.weight"])
    assert after["head.weight"].shape[0] == 4 and before["head.weight"].shape[0] == 3


@pytest.mark.slow
def test_the_language_model_walkthrough_runs_as_written(tmp_path):
    pytest.importorskip("peft", reason="causal-lm needs the nlp extra: pip install 'kubetrain[nlp]'")
    _, output = run_walkthrough(tmp_path, REPO / "docs" / "llm.md", ["bash", "python", "bash", "text", "python"],
                                "kubetrain run my-lora")
    match = re.search(r"answered (\d+) of (\d+)", output)
    assert match, output
    print(f"llm walk-through: the export answered {match.group(1)} of {match.group(2)}")
    assert int(match.group(1)) >= 0.75 * int(match.group(2))
