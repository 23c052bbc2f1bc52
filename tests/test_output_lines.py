"""Lines of different ranks never share a line, and master-0's summary is never lost.

torchrun's workers write to one stdout (the pod's log, or `kubetrain run`'s pipe). Two real
processes here print as the trainer does under PYTHONUNBUFFERED=1, concurrently, into one pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys

from support import REPO
from trainer.summary import find as summary_in

WRITER = """
import sys
from trainer.worker.main import whole_line_output
if sys.argv[2] == "fixed":
    whole_line_output()
for i in range(20000):
    print(f"rank {sys.argv[1]} line {i} " + "x" * 40)
    print(f"rank {sys.argv[1]} warning {i}", file=sys.stderr)
"""


def lines_from_two_ranks(mode: str) -> list[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank), mode], stdout=write, stderr=write, env=env)
             for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    assert all(proc.wait(timeout=60) == 0 for proc in procs)
    return lines


def whole(line: str) -> bool:
    words = line.split(" ")
    return words[0] == "rank" and (words[2:3] == ["line"] and len(words) == 5 and words[4] == "x" * 40
                                   or words[2:3] == ["warning"] and len(words) == 4 and words[3].isdigit())


def test_every_line_arrives_whole():
    lines = lines_from_two_ranks("fixed")
    assert len(lines) == 4 * 20000
    broken = [line for line in lines if not whole(line)]
    assert not broken, broken[:5]


def test_the_check_sees_glued_lines_without_the_fix():
    """The test above can fail: unbuffered print() does glue lines of two ranks (how often depends on
    the scheduler, so up to five tries)."""
    assert any(any(not whole(line) for line in lines_from_two_ranks("unbuffered")) for _ in range(5))


def test_the_runner_finds_the_summary_in_a_glued_line():
    line = 'warning: rank 1 says hi{"event": "summary", "status": "ok", "steps": 12}[W] more\n'
    assert summary_in(line) == {"event": "summary", "status": "ok", "steps": 12}
    assert summary_in('{"event": "summary", "status": "ok"') is None  # cut short: not a summary


def test_log_streams_are_cut_into_whole_lines_wherever_the_chunks_end():
    """`kubetrain logs` prefixes every line of a pod's log: chunks from the API server end mid-line
    and mid-character, and a line must still arrive whole (the JSON summary parses)."""
    from trainer.controller.jobs import whole_lines

    text = 'step 1/2 loss 0.5\n{"event": "summary", "status": "succeeded", "note": "é"}\r\nlast, no newline'
    data = text.encode()
    for size in (1, 2, 3, 7, len(data)):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(whole_lines(chunks)) == ["step 1/2 loss 0.5", '{"event": "summary", "status": "succeeded", '
                                             '"note": "é"}', "last, no newline"], size
