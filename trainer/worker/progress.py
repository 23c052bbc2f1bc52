"""What the loop measures between log lines: step timing and the log window.

StepTimer splits each step's wall time into data wait (from the end of the
last step until the batch arrived) and the rest. LogWindow sums the loss and
this rank's compute time over the steps since the last log line; closing it
at a log step reduces the loss across ranks (the loop's only sync point
besides checkpoints and evaluation) and yields what the log line, the
metrics and TensorBoard report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


NEVER = 2**62  # "no such step" for a step number kept in a tensor


class StepTimer:
    def __init__(self) -> None:
        self.tick = self.arrived = time.perf_counter()

    def batch_arrived(self) -> None:
        self.arrived = time.perf_counter()

    def since_arrival(self) -> float:
        return time.perf_counter() - self.arrived

    def lap(self) -> tuple[float, float]:
        """(step seconds, data-wait seconds) of the step that just ended; the next one starts now."""
        now = time.perf_counter()
        lap = (now - self.tick, self.arrived - self.tick)
        self.tick = now
        return lap

    def restart(self) -> None:
        """After a checkpoint or an evaluation: that time is not the next step's data wait."""
        self.tick = time.perf_counter()


@dataclass
class WindowReport:
    train_loss: float  # mean over ranks and the window's steps
    samples_per_second: float
    eta_seconds: float
    step_seconds: float  # this rank's mean compute time per step (data wait excluded)


class LogWindow:
    def __init__(self, device: torch.device, every: int, total_steps: int, samples_per_step: int,
                 first_step: int) -> None:
        self.every, self.total_steps, self.samples_per_step = every, total_steps, samples_per_step
        self.first_step = first_step  # where this attempt started (a resume starts mid-run)
        self.run_start = self.start = time.perf_counter()
        self.loss = torch.zeros((), device=device)
        self.steps, self.compute = 0, 0.0
        self.last_loss: float | None = None  # of the last closed window: the run's train_loss
        # The first step whose loss was not finite, kept on the device (no sync per step); NEVER if none.
        self.first_nonfinite = torch.full((), NEVER, dtype=torch.long, device=device)

    def add(self, step_loss: torch.Tensor, compute_seconds: float, step: int) -> None:
        self.loss += step_loss
        self.steps += 1
        self.compute += compute_seconds
        bad = torch.where(torch.isfinite(step_loss), NEVER, step)
        torch.minimum(self.first_nonfinite, bad, out=self.first_nonfinite)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.total_steps

    def close(self, step: int) -> WindowReport:
        """A collective: every rank closes the window at the same step."""
        self.last_loss = mean_across_ranks(self.loss / self.steps).item()
        now = time.perf_counter()
        report = WindowReport(
            train_loss=self.last_loss,
            samples_per_second=self.steps * self.samples_per_step / (now - self.start),
            eta_seconds=(self.total_steps - step) * (now - self.run_start) / (step - self.first_step),
            step_seconds=self.compute / self.steps,
        )
        self.loss.zero_()
        self.steps, self.start, self.compute = 0, now, 0.0
        return report

    @property
    def finite(self) -> bool:
        return self.last_loss is None or math.isfinite(self.last_loss)

    def first_nonfinite_step(self) -> int | None:
        """A collective, once the window is not finite: the earliest step any rank saw a NaN or
        infinite loss at (the window's mean only says that one of its steps had one)."""
        first = self.first_nonfinite.clone()
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.item())
        return None if step == NEVER else step
