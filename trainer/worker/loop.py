"""The training loop: one Trainer owns model, optimizer, schedule and data for a run."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.config import TrainerConfig, TrainingConfig
from trainer.errors import UserError
from trainer.tasks import get_task
from trainer.worker.data import build_loaders, move
from trainer.worker.distributed import RankInfo

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: a permanent failure (exit 1)."""


@dataclass
class TrainState:
    """Where the run is; the checkpoint's notion of progress."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def lr_lambda(cfg: TrainingConfig, total_steps: int):
    """Linear warmup, then cosine decay to minLrRatio (or constant)."""
    sched = cfg.lr_schedule
    warmup = min(sched.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sched.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def freeze_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Freeze parameters whose name starts with any prefix; returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            frozen += 1
    if prefixes and not frozen:
        raise UserError(f"training.finetune.freeze: no parameter name starts with any of {list(prefixes)}")
    return frozen


def build_optimizer(cfg: TrainingConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def _mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


class Trainer:
    def __init__(self, config: TrainerConfig, info: RankInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        cfg = self.cfg = config.training
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.spec = get_task(cfg.task)(cfg)
        model = self.spec.model.to(device)
        freeze_parameters(model, cfg.finetune.freeze)
        self.raw_model = model
        if cfg.parallelism == "fsdp":
            raise UserError("training.parallelism: fsdp is not available in this version; use ddp")
        if info.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model
        torch.manual_seed(cfg.seed + info.rank)  # per-rank randomness (dropout, augmentation)

        self.train_loader, self.sampler, self.eval_loader = build_loaders(self.spec, cfg, info, device)
        self.steps_per_epoch = len(self.train_loader) // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(
                f"training.gradAccumSteps: {cfg.grad_accum_steps} micro-batches per step exceed the "
                f"{len(self.train_loader)} micro-batches of one epoch"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES.get(cfg.precision)
        self.state = TrainState()
        self.samples_per_step = cfg.batch_size * cfg.grad_accum_steps * info.world_size
        self.history: list[tuple[int, float]] = []  # (step, mean train loss over the log window)

    # ------------------------------------------------------------ steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_loss(self, batch) -> torch.Tensor:
        inputs, targets = move(batch, self.device)
        with self._autocast():
            outputs = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
            return self.spec.loss_fn(outputs, targets)

    def train_step(self, micro_batches: list) -> torch.Tensor:
        """One optimizer step over `gradAccumSteps` micro-batches; returns the mean loss (no sync)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip the gradient all-reduce on all but the last micro-batch.
            sync = contextlib.nullcontext() if last or not isinstance(self.model, DDP) else self.model.no_sync()
            with sync:
                loss = self._forward_loss(batch) / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if cfg.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        return total

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float | None]:
        """(loss, accuracy) over the whole eval set, reduced across ranks."""
        if self.eval_loader is None:
            return None, None
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
        for batch in self.eval_loader:
            inputs, targets = move(batch, self.device)
            with self._autocast():
                outputs = self.raw_model(**inputs) if isinstance(inputs, dict) else self.raw_model(inputs)
                loss = self.spec.loss_fn(outputs, targets)
            n = targets.shape[0]
            sums[0] += loss.double() * n
            if self.spec.accuracy:
                logits = getattr(outputs, "logits", outputs)
                sums[1] += (logits.argmax(dim=-1) == targets).sum()
            sums[2] += n
        self.model.train()
        if dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        if sums[2] == 0:
            return None, None
        accuracy = (sums[1] / sums[2]).item() if self.spec.accuracy else None
        return (sums[0] / sums[2]).item(), accuracy

    # ------------------------------------------------------------ the run
    def _micro_batches(self):
        """Yield lists of gradAccumSteps micro-batches, epoch by epoch, resuming mid-epoch."""
        accum = self.cfg.grad_accum_steps
        while self.state.epoch < self.cfg.epochs:
            self.sampler.set_epoch(self.state.epoch)
            group: list = []
            for index, batch in enumerate(self.train_loader):
                if index < self.state.batch_in_epoch:
                    continue  # consumed before a resume
                if index >= self.steps_per_epoch * accum:
                    break  # a trailing partial step is dropped
                group.append(batch)
                if len(group) == accum:
                    self.state.batch_in_epoch = index + 1
                    yield group
                    group = []
            yield None  # epoch boundary
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        self.model.train()
        start = time.perf_counter()
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start = 0, start
        eval_loss = eval_acc = None
        train_loss = float("nan")
        steps_at_start = self.state.step
        for group in self._micro_batches():
            if group is None:
                if (self.state.epoch + 1) % cfg.eval_every_epochs == 0 or self.state.step >= self.total_steps:
                    eval_loss, eval_acc = self.evaluate()
                    if info.is_main:
                        log.info("epoch %d eval: loss=%s accuracy=%s", self.state.epoch + 1,
                                 _fmt(eval_loss), _fmt(eval_acc))
                if self.state.step >= self.total_steps:
                    break
                continue
            window_loss += self.train_step(group)
            window_steps += 1
            done = self.state.step >= self.total_steps
            if self.state.step % cfg.log_every_steps == 0 or done:
                train_loss = _mean_across_ranks(window_loss / window_steps).item()
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(f"train loss is {train_loss} at step {self.state.step}")
                self.history.append((self.state.step, train_loss))
                now = time.perf_counter()
                rate = window_steps * self.samples_per_step / (now - window_start)
                eta = (self.total_steps - self.state.step) * (now - start) / (self.state.step - steps_at_start)
                if info.is_main:
                    log.info("step %d/%d epoch %d loss %.4f lr %.3g samples/s %.0f eta %.0fs",
                             self.state.step, self.total_steps, self.state.epoch + 1, train_loss,
                             self.scheduler.get_last_lr()[0], rate, eta)
                window_loss.zero_()
                window_steps, window_start = 0, now
            if done and self.state.batch_in_epoch < self.steps_per_epoch * cfg.grad_accum_steps:
                eval_loss, eval_acc = self.evaluate()  # maxSteps hit mid-epoch: evaluate once more
                break
        wall = time.perf_counter() - start
        steps_run = self.state.step - steps_at_start
        return {
            "event": "summary",
            "status": "succeeded",
            "experiment": self.config.experiment,
            "steps": self.state.step,
            "epochs": self.state.epoch + (1 if self.state.batch_in_epoch else 0),
            "world_size": info.world_size,
            "train_loss": train_loss,
            "first_train_loss": self.history[0][1] if self.history else None,
            "eval_loss": eval_loss,
            "eval_accuracy": eval_acc,
            "samples_per_second": steps_run * self.samples_per_step / wall if wall > 0 else 0.0,
            "wall_seconds": round(wall, 3),
            "checkpoint": None,
        }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
