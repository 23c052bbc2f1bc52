"""What the loop measures between log lines: step timing and the log window.

StepTimer splits each step's wall time into data wait (from the end of the
last step until the batch arrived) and the rest. LogWindow sums the loss, the
real tokens (of tasks that count them) and this rank's compute time over the
steps since the last log line, the sums on the device; closing it at a log
step reduces loss and tokens across ranks in one collective (the loop's only
sync point besides checkpoints and evaluation) and yields what the log line,
the metrics and TensorBoard report.
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
    steps_per_second: float  # optimizer steps over the window's wall time
    rank_tokens: int = 0  # real tokens this rank trained on in the window
    tokens_per_second: float | None = None  # all ranks' real tokens over the window's wall time


class LogWindow:
    def __init__(self, device: torch.device, every: int, total_steps: int, samples_per_step: int,
                 first_step: int) -> None:
        self.every, self.total_steps, self.samples_per_step = every, total_steps, samples_per_step
        self.first_step = first_step  # where this attempt started (a resume starts mid-run)
        self.run_start = self.start = time.perf_counter()
        self.loss = torch.zeros((), device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.counts_tokens = False  # whether the task counted any (count_tokens)
        self.run_tokens = 0.0  # all ranks' real tokens in the closed windows: the summary's tokens/s
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

    def add_tokens(self, count) -> None:
        """A micro-batch's real tokens: a tensor (on the device or a CPU scalar) or an int; no sync."""
        self.tokens += torch.as_tensor(count).long()  # a float mask's sum counts too
        self.counts_tokens = True

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.total_steps

    def close(self, step: int) -> WindowReport:
        """A collective: every rank closes the window at the same step."""
        mine = self.tokens.double()
        sums = torch.stack([self.loss.double() / self.steps, mine])
        if dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sums[0] /= dist.get_world_size()
        loss, tokens = sums.tolist()
        self.last_loss = loss
        now = time.perf_counter()
        seconds = now - self.start
        report = WindowReport(
            train_loss=loss,
            samples_per_second=self.steps * self.samples_per_step / seconds,
            eta_seconds=(self.total_steps - step) * (now - self.run_start) / (step - self.first_step),
            step_seconds=self.compute / self.steps,
            steps_per_second=self.steps / seconds,
        )
        if self.counts_tokens:
            report.rank_tokens, report.tokens_per_second = int(mine.item()), tokens / seconds
            self.run_tokens += tokens
        self.loss.zero_()
        self.tokens.zero_()
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
