"""Goodput: the share of the experiment's wall time, since its first start and across every restart and
resume, that produced training progress the run kept; and where the rest went.

Each rank keeps an account in seconds (rank 0's is the summary's figure; every rank exports its own):

- `productive`: compute time of the steps that are kept (data wait excluded);
- losses: `startup` (process start to the loop's first step: interpreter, imports, rendezvous, model,
  checkpoint load), `data_wait`, `checkpoint_stall` (the loop blocked in a save, and the final wait
  for one in flight), `evaluation`, `lost_work` (an attempt's time after the state its checkpoint
  holds, up to its last heartbeat: the steps a resume redoes, and whatever else that attempt did then),
  `between_attempts` (from the previous attempt's last heartbeat to this process's start), and
  `other` (the rest of the wall time: log steps, export, ...), so the parts add up to the wall time.

What survives a restart travels in two places. The checkpoint holds the account as of its save
(`state()`, in each rank's file beside train_state), so steps after it are not counted as kept. A
heartbeat, `<experiment>/goodput/rank-NNNNN.json` in the checkpoint store, holds the live account,
its step and its wall time, written at log steps, after a blocking save and at the end of an attempt.
On resume (`resumed`): a heartbeat at the checkpoint's step written after that save (a clean
preemption) is taken whole; one from a later step says the work after the checkpoint was lost, from
the save to the heartbeat; without a usable heartbeat (killed before any log step after the save)
that time counts as between attempts. Without checkpoint.uri nothing survives: each attempt is an
experiment of its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger(__name__)

LOSSES = ("startup", "data_wait", "checkpoint_stall", "evaluation", "lost_work", "between_attempts")
HEARTBEAT_DIR = "goodput"


def heartbeat_key(base: str, rank: int) -> str:
    return f"{base}/{HEARTBEAT_DIR}/rank-{rank:05d}.json"


class Goodput:
    """One rank's account. Seconds come from perf_counter differences; the experiment's first start
    and the heartbeat times are wall clock (time.time()), the only clock that spans processes."""

    def __init__(self, process_start: float, store=None, key: str = "") -> None:
        self.process_start = process_start  # wall time this process started
        self.first_start = process_start  # of the experiment; a resume replaces it
        self.productive = 0.0
        self.losses = {name: 0.0 for name in LOSSES}
        self.store, self.key = store, key
        self._writing: threading.Thread | None = None  # a heartbeat being written beside training

    # ------------------------------------------------------------ accounting
    def add(self, reason: str, seconds: float) -> None:
        self.losses[reason] += max(seconds, 0.0)

    def step(self, step_seconds: float, data_wait_seconds: float) -> None:
        """A step's lap (data wait included) from StepTimer."""
        wait = max(data_wait_seconds, 0.0)
        self.losses["data_wait"] += wait
        self.productive += max(step_seconds - wait, 0.0)

    def wall(self, now: float | None = None) -> float:
        return max((time.time() if now is None else now) - self.first_start, 0.0)

    def report(self, now: float | None = None) -> dict:
        """{"wall", "productive", "goodput", "losses": {reason: seconds, ..., "other"}}."""
        wall = self.wall(now)
        losses = dict(self.losses)
        losses["other"] = max(wall - self.productive - sum(losses.values()), 0.0)
        return {"wall": wall, "productive": self.productive,
                "goodput": self.productive / wall if wall > 0 else None, "losses": losses}

    # ------------------------------------------------------------ what survives a restart
    def state(self, step: int) -> dict:
        """The account as of now, for a checkpoint of `step` (and for a heartbeat)."""
        return {"first_start": self.first_start, "productive": self.productive, "losses": dict(self.losses),
                "step": step, "time": time.time()}

    def resumed(self, saved: dict | None, step: int) -> None:
        """This attempt resumed the checkpoint of `step`, whose account is `saved` (None: a checkpoint
        from before goodput was kept; the experiment then counts from this process's start)."""
        if not saved:
            return
        heartbeat = self._read_heartbeat()
        if heartbeat and heartbeat.get("first_start") != saved["first_start"]:
            heartbeat = None  # another experiment's, under the same name
        if heartbeat and heartbeat["step"] == step and heartbeat["time"] >= saved["time"]:
            base, last = heartbeat, heartbeat["time"]  # stopped right after this save: nothing lost
        else:
            base, last = saved, saved["time"]
            if heartbeat and heartbeat["step"] > step and heartbeat["time"] > saved["time"]:
                last = heartbeat["time"]
        self.first_start = base["first_start"]
        self.productive = base["productive"]
        previous = dict(self.losses)  # this attempt's start-up so far
        self.losses = {name: base["losses"].get(name, 0.0) + previous[name] for name in LOSSES}
        self.add("lost_work", last - base["time"])
        self.add("between_attempts", self.process_start - last)

    def heartbeat(self, step: int, wait: bool = False) -> None:
        """Leave the live account where the next attempt finds it. At log steps (`wait` False) the write
        runs beside training, and is skipped while the last one is still in flight (the next supersedes
        it); after a blocking save and at the end it is written before returning, after any in flight."""
        if self.store is None:
            return
        record = json.dumps(self.state(step)).encode()
        if self._writing is not None and self._writing.is_alive():
            if not wait:
                return
            self._writing.join()
        if wait:
            self._write(record)
        else:
            self._writing = threading.Thread(target=self._write, args=(record,), name="goodput-heartbeat",
                                             daemon=True)
            self._writing.start()

    def _write(self, record: bytes) -> None:
        store = self.store
        if store is None:
            return
        try:
            store.write_bytes(self.key, record)
        except Exception as e:  # noqa: BLE001 - goodput must never stop training; the checkpoints report storage
            self.store = None  # no more heartbeats this attempt: each would wait out s3.retrySeconds again
            log.warning("goodput: cannot write the heartbeat %s (%s); no more heartbeats from this attempt, so "
                        "a restart counts its time since its last checkpoint as between attempts",
                        store.url(self.key), e)

    def _read_heartbeat(self) -> dict | None:
        if self.store is None:
            return None
        try:
            record = json.loads(self.store.read_bytes(self.key))
            return record if isinstance(record, dict) and {"step", "time", "losses"} <= record.keys() else None
        except Exception:  # noqa: BLE001 - absent or unreadable: as if the attempt left none
            return None


def describe(report: dict) -> str:
    """One log line's text: `goodput 81.2% of 40.1s since the first start: productive 32.6s; losses ...`."""
    ratio = report["goodput"]
    losses = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report["losses"].items())
    return (f"goodput {'n/a' if ratio is None else f'{ratio:.1%}'} of {report['wall']:.1f}s since the "
            f"experiment's first start: productive {report['productive']:.1f}s; losses: {losses}")
