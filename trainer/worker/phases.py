"""No silent minutes: rank 0 says what it is doing whenever its log has been quiet for QUIET_SECONDS.

The loop names the phase it enters (building the task, training, evaluation, a
checkpoint, the export) and, where it has one, a count of work done; a daemon
thread watches the time since rank 0's last log line and, past the limit, logs
the phase, its progress and how long it has run, in the run's log format. A
phase that logs by itself (a progress line every few steps) is never repeated.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

log = logging.getLogger("trainer.progress")

QUIET_SECONDS = 3.0  # under the 5 s a user should ever wait for a line, with room for a GIL held in C
# A phase that stays quiet gets its lines further apart (3, 6, 12 ... s): an LLM step of a minute
# must not fill `kubectl logs` with a line every 3 s.
MAX_QUIET_SECONDS = 60.0


class _Stamp(logging.Filter):
    """On the log's handler: notes when a line was last written, whoever wrote it."""

    def __init__(self, phases: "Phases"):
        super().__init__()
        self.phases = phases

    def filter(self, record: logging.LogRecord) -> bool:
        self.phases.last_line = time.monotonic()
        return True


class Phases:
    def __init__(self) -> None:
        self.name: str | None = None
        self.unit, self.done, self.total = "", 0, 0
        self.started = self.last_line = time.monotonic()
        self.quiet = QUIET_SECONDS
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def enter(self, name: str, total: int = 0, unit: str = "", done: int = 0) -> None:
        """The phase now running (with `total` `unit`s to do, if countable)."""
        self.name, self.total, self.unit, self.done = name, total, unit, done
        self.started = time.monotonic()
        self.quiet = QUIET_SECONDS

    def progress(self, done: int) -> None:
        self.done = done

    def line(self) -> str:
        count = f" {self.done}/{self.total} {self.unit}" if self.total else ""
        return f"{self.name}:{count} ({time.monotonic() - self.started:.0f}s)"

    @contextlib.contextmanager
    def watching(self, enabled: bool) -> Iterator["Phases"]:
        """Run the watcher (rank 0: `enabled`) for the duration of the block."""
        if not enabled:
            yield self
            return
        stamp = _Stamp(self)
        handlers = logging.getLogger().handlers
        for handler in handlers:
            handler.addFilter(stamp)
        self.last_line = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="kubetrain-phases", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            for handler in handlers:
                handler.removeFilter(stamp)
            self.name = None

    def tick(self, now: float) -> bool:
        """One look of the watcher: log the phase if the log has been quiet for long enough."""
        if not self.name or now - self.last_line < self.quiet:
            return False
        log.info("%s", self.line())
        self.last_line = now
        self.quiet = min(self.quiet * 2, MAX_QUIET_SECONDS)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            self.tick(time.monotonic())


PHASES = Phases()  # one per process, like the start-up clock
