"""Preemption: SIGTERM on any rank -> every rank stops at the same step boundary.

Kubernetes sends SIGTERM to a pod it evicts (spot reclaim, node drain) and
SIGKILL after the grace period. The signal reaches one pod, not all, so ranks
agree through a one-element MAX all-reduce of "was I signalled?" at every step
boundary. The collective is issued asynchronously at boundary t and read at
boundary t+1, so it never stalls the step: on CPU (gloo) it completes in the
background while the next step computes; on GPU (NCCL) the result is copied to
pinned host memory behind a CUDA event. All ranks read the same reduction at
the same boundary, hence agree on the same step; the loop then saves, commits
and exits 143 (EXIT_PREEMPTED), which `restartPolicy: ExitCode` restarts.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from trainer.storage import stop_waiting

log = logging.getLogger(__name__)


class PreemptionWatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.signalled = threading.Event()
        self.stop_agreed = False
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._pending = None  # (work, cuda event or None) of the previous boundary's all-reduce
        self._previous_handler = None

    def install(self) -> "PreemptionWatch":
        """Catch SIGTERM (main thread only; elsewhere the watch just never fires)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, _frame) -> None:
        if not self.signalled.is_set():
            log.warning("SIGTERM received: checkpointing at the next step boundary, then exiting 143")
        self.signalled.set()
        stop_waiting()  # a store waiting out an outage (a resume, say) gives up now: exit 143, not 144 later

    def should_stop(self) -> bool:
        """Call once per optimizer step on every rank; True on all ranks at the same step."""
        if self.stop_agreed:
            return True
        if not self._distributed:
            self.stop_agreed = self.signalled.is_set()
            return self.stop_agreed
        if self._pending is not None:
            work, event = self._pending
            work.wait()
            if event is not None:
                event.synchronize()  # only the tiny copy queued behind the previous step
            else:
                self._host.copy_(self._flag)
            self._pending = None
            if int(self._host.item()):
                self.stop_agreed = True
                return True
        self._flag.fill_(1 if self.signalled.is_set() else 0)
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self.device.type == "cuda":
            work.wait()  # orders the current stream after the collective; does not block the host
            self._host.copy_(self._flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, event)
        return False

    def drain(self) -> None:
        """Complete an outstanding all-reduce (before other collectives or shutdown)."""
        if self._pending is not None:
            work, event = self._pending
            work.wait()
            if event is not None:
                event.synchronize()
            self._pending = None
