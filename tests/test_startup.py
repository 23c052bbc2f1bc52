"""Start-up helpers of the in-pod trainer (trainer/worker/startup.py)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from trainer.worker.startup import import_in_background
assert "torch._dynamo" not in sys.modules
import_in_background("torch._dynamo").join()
print("loaded" if "torch._dynamo" in sys.modules else "missing")
import_in_background("no_such_module_here").join()  # left to the real import: no error here
import torch
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())  # what it was loaded for still works
"""


def test_the_optimizers_dynamo_import_is_done_by_the_background_thread():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded" and "Traceback" not in result.stderr
