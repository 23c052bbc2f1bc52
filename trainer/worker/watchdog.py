"""Hang detection (docs/architecture.md): a retryable exit instead of a job stuck forever.

A rank whose peer hangs (or is frozen) blocks inside a collective, in C++,
where no Python exception can reach it. A daemon thread watches the time since
the loop last made progress (a step, an evaluation, a checkpoint) and, past
`training.distributed.hangTimeoutSeconds`, logs what it saw and ends the
process with EXIT_HANG so the operator (restartPolicy: ExitCode) restarts the
job from its newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

from trainer.errors import EXIT_HANG

log = logging.getLogger(__name__)


def _exit_hung() -> None:
    sys.stdout.flush()
    os._exit(EXIT_HANG)  # the main thread is stuck in C++: only a hard exit ends the process


class HangWatchdog:
    def __init__(self, timeout_seconds: float, on_hang: Callable[[], None] = _exit_hung):
        self.timeout, self.on_hang = timeout_seconds, on_hang
        self.last_progress = time.monotonic()
        self.what = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, what: str) -> None:
        """The loop made progress (a plain assignment: cheap enough for every step)."""
        self.last_progress, self.what = time.monotonic(), what

    def start(self) -> "HangWatchdog":
        if self.timeout > 0:
            self.beat("start")
            self._thread = threading.Thread(target=self._watch, name="kubetrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(5.0, max(self.timeout / 10, 0.05))
        while not self._stop.wait(interval):
            idle = time.monotonic() - self.last_progress
            if idle > self.timeout:
                log.error("hang detected: no progress for %.0fs (last: %s; training.distributed."
                          "hangTimeoutSeconds=%s); exiting %d so the job is retried", idle, self.what,
                          self.timeout, EXIT_HANG)
                self.on_hang()
                return
