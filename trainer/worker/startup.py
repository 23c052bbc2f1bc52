"""Where a run's start-up goes, from process start to rank 0's first completed step, as one log line.

    start-up: interpreter 0.05s, imports 2.10s, config and metrics 0.02s, rendezvous 0.31s,
    data and model 0.40s, resume 0.00s, first step 0.12s; 3.00s from process start

The clock starts when `trainer.worker.main` is imported; the time before that
(interpreter start, site-packages) comes from the process's start time in /proc.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time

log = logging.getLogger("trainer.startup")


def process_age() -> float:
    """Seconds since this process started (Linux /proc), or 0.0 where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return 0.0


class StartupClock:
    """Phases of start-up, each ending at its `mark`; reported once, at the first step."""

    def __init__(self) -> None:
        now = time.perf_counter()
        self.origin = now - process_age()
        self.phases: list[tuple[str, float]] = [("interpreter", now)]
        self.reported = False

    def mark(self, phase: str) -> None:
        if not self.reported:
            self.phases.append((phase, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        out, previous = {}, self.origin
        for name, end in self.phases:
            out[name] = end - previous
            previous = end
        return out

    def report(self, is_main: bool) -> None:
        """The first step is done: say where the time went (rank 0), once."""
        if self.reported:
            return
        self.mark("first step")
        self.reported = True
        if is_main:
            phases = self.seconds()
            log.info("start-up: %s; %.2fs from process start",
                     ", ".join(f"{name} {s:.2f}s" for name, s in phases.items()), sum(phases.values()))


def import_in_background(module: str, device=None) -> threading.Thread:
    """Start importing `module` in a thread; join it before anything forks (DataLoader workers).

    Used for torch._dynamo: torch's optimizers import it on first construction (PyTorch's
    `_disable_dynamo` decorator), about 2 s of CPU that a plain loop pays too. Started before the
    rendezvous, it runs while this rank waits for its peers. On CUDA the thread first selects this
    rank's device, so nothing it touches lands on GPU 0. A failure is left to the real import."""
    def load() -> None:
        try:
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the optimizer's own import raises it where it matters
            log.debug("background import of %s failed", module, exc_info=True)

    thread = threading.Thread(target=load, name=f"import-{module}", daemon=True)
    thread.start()
    return thread


STARTUP = StartupClock()  # one per process: the process's own start-up
