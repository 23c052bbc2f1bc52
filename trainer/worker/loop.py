"""The training loop: one Trainer owns model, optimizer, schedule and data for a run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainerConfig, TrainingConfig
from trainer.errors import EXIT_FAILURE, UserError
from trainer.tasks import get_task
from trainer.tasks._finetune import freeze as freeze_parameters
from trainer.tasks._weights import WeightsReader
from trainer.worker.data import build_loaders, move
from trainer.worker.distributed import RankInfo
from trainer.worker.efficiency import Efficiency
from trainer.worker.goodput import Goodput, describe as describe_goodput, heartbeat_key
from trainer.worker.parallel import (even_eval_batches, fsdp_mixed_precision, gradient_sync, is_fsdp,
                                     parallelize, run_epoch_start_hook)
from trainer.worker.phases import PHASES
from trainer.worker.metrics import DISABLED, MetricsProcessor
from trainer.worker.progress import LogWindow, StepTimer, mean_across_ranks
from trainer.worker.startup import STARTUP
from trainer.worker.tensorboard import TensorBoardLogger
from trainer.worker.watchdog import HangWatchdog

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: a permanent failure (exit 1), told in one line."""

    exit_code = EXIT_FAILURE


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


def build_optimizer(cfg: TrainingConfig, model: nn.Module, spec=None) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if spec is not None and spec.param_groups is not None:  # e.g. a backbone at a lower LR
        params = [{"params": g["params"], "lr": opt.lr * g.get("lr_scale", 1.0)}
                  for g in spec.param_groups(model) if g["params"]]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


class Trainer:
    def __init__(self, config: TrainerConfig, info: RankInfo, device: torch.device,
                 metrics: MetricsProcessor = DISABLED):
        self.config, self.info, self.device = config, info, device
        self.metrics = metrics
        self.tensorboard = TensorBoardLogger(config, info, device)
        self.grad_norm: torch.Tensor | None = None  # of the last step that measured it
        # Owned here so evaluation can report progress too; fit() replaces it with a running one.
        self.watchdog = HangWatchdog(0)
        cfg = self.cfg = config.training
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        PHASES.enter(f"building the {cfg.task} task (model and datasets)")
        # training.pretrained: s3:// reads with the checkpoints' S3 settings
        self.spec = spec = get_task(cfg.task)(cfg, weights=WeightsReader(config.s3))
        model = spec.model
        PHASES.enter(f"placing the model on {device} ({cfg.parallelism})")
        if spec.materialize is None:
            model = model.to(device)
        freeze_parameters(model, cfg.finetune.freeze)
        if info.is_main:
            log_parameter_counts(model, cfg.finetune.freeze)
        # A model built on the meta device loads its weights where they will live: after FSDP
        # sharded it (each rank reads its shards), before DDP broadcasts rank 0's replica.
        sharded = cfg.parallelism == "fsdp" and info.world_size > 1
        if spec.materialize is not None and not sharded:
            spec.materialize(model, device)
        # FSDP shards in place, so raw_model is the sharded module then (eval must use it).
        self.raw_model = model
        self.model = model = parallelize(model, spec, cfg, info.world_size, device)
        if spec.materialize is not None and sharded:
            spec.materialize(model, device)
        torch.manual_seed(cfg.seed + info.rank)  # per-rank randomness (dropout, augmentation)

        PHASES.enter("building the data loaders")
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
        self.optimizer = build_optimizer(cfg, self.raw_model, self.spec)  # unprefixed names
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES.get(cfg.precision)
        if cfg.parallelism == "fsdp" and fsdp_mixed_precision(cfg.precision, device):
            self.autocast_dtype = None  # FSDP's MixedPrecisionPolicy casts instead
        self.state = TrainState()
        self.samples_per_step = cfg.batch_size * cfg.grad_accum_steps * info.world_size
        self.efficiency = Efficiency(device, cfg.precision, config.metrics.peak_flops)
        if info.is_main:
            log.info("%s", self.efficiency.describe())
        self.history: list[tuple[int, float]] = []  # (step, mean train loss over the log window)
        self.eval_loss: float | None = None  # of the last evaluation
        self.eval_accuracy: float | None = None
        # What summary() reports, set by fit(): also after a failure, so it names the true step.
        self.window: LogWindow | None = None
        self.checkpoints = None  # the run's CheckpointManager
        self.outputs: dict[str, str] = {}  # the exported folders: {"model": URL} (and "adapter")
        # The experiment's goodput account (trainer/worker/goodput.py), from this process's start.
        self.goodput = Goodput(time.time() - (time.perf_counter() - STARTUP.origin))
        self._saved_goodput: dict | None = None  # the account a resumed checkpoint held

    # ------------------------------------------------------------ steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_loss(self, batch) -> torch.Tensor:
        inputs, targets = move(batch, self.device)
        with self._autocast():
            outputs = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
            return self._loss(outputs, targets)

    def _loss(self, outputs, targets) -> torch.Tensor:
        try:
            return self.spec.loss_fn(outputs, targets)
        except IndexError as e:  # cross-entropy on CPU: "Target 3 is out of bounds."
            if "out of bounds" not in str(e):
                raise
            width = getattr(outputs, "logits", outputs).shape[-1]
            raise UserError(f"training.numClasses: a label is out of range for the model's {width} outputs "
                            f"({str(e).rstrip('.')}); training.numClasses is {self.cfg.num_classes}, so labels "
                            f"must be 0 to {width - 1}") from None

    def train_step(self, micro_batches: list) -> torch.Tensor:
        """One optimizer step over `gradAccumSteps` micro-batches; returns the mean loss (no sync)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        count_tokens = self.spec.count_tokens if self.window is not None else None
        # The model FLOPs of a step, counted on the first one (then a no-op): what MFU divides.
        with self.efficiency.count(len(micro_batches), cfg.batch_size * len(micro_batches), self.info.is_main):
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                if count_tokens is not None:
                    self.window.add_tokens(count_tokens(batch))
                # Skip the gradient all-reduce (reduce-scatter under FSDP) on all but the last micro-batch.
                with gradient_sync(self.model, enabled=last):
                    loss = self._forward_loss(batch) / len(micro_batches)
                    self.scaler.scale(loss).backward()
                total += loss.detach().float()
        next_step = self.state.step + 1
        log_step = next_step % cfg.log_every_steps == 0 or next_step >= self.total_steps
        if cfg.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        elif log_step and (self.metrics.enabled or self.tensorboard.enabled):
            # the norm for the metric and TensorBoard, only where the loop syncs anyway
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)  # clips nothing
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
        PHASES.enter(f"evaluation at step {self.state.step}", total=len(self.eval_loader), unit="batches")
        for done, (batch, counts) in enumerate(even_eval_batches(self.eval_loader, self.model)):
            PHASES.progress(done)
            # A long evaluation is progress, not a hang: keep the watchdog and the heartbeat fed.
            self.watchdog.beat("evaluation")
            self.metrics.observe_progress()
            inputs, targets = move(batch, self.device)
            with self._autocast():
                outputs = self.raw_model(**inputs) if isinstance(inputs, dict) else self.raw_model(inputs)
                loss = self._loss(outputs, targets)
            if not counts:
                continue  # an FSDP filler forward that keeps ranks in step
            if self.spec.eval_counts is not None:  # e.g. tokens with a label, not examples
                n, correct = self.spec.eval_counts(outputs, targets)
            else:
                n = targets.shape[0]
                correct = (getattr(outputs, "logits", outputs).argmax(dim=-1) == targets).sum()
            sums[0] += loss.double() * n
            if self.spec.accuracy:
                sums[1] += correct
            sums[2] += n
        self.model.train()
        self._training_phase()
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
            if self.spec.on_epoch_start:  # e.g. unfreeze a backbone
                self.model = run_epoch_start_hook(self.spec, self.model, self.raw_model, self.device,
                                                  self.state.epoch)
            # A resume starts at its data position: the batches before it are not loaded again.
            self.sampler.set_epoch(self.state.epoch, skip=self.state.batch_in_epoch * self.cfg.batch_size)
            if isinstance(self.train_loader, torch.utils.data.DataLoader):
                # Worker seeds from a per-epoch generator, not the global RNG: a mid-epoch resume that
                # restores the RNG then recreates the iterator sees the same randomness as an unbroken run.
                self.train_loader.generator = torch.Generator().manual_seed(
                    (self.cfg.seed + self.state.epoch) * 1_000_003 + self.info.rank)
            group: list = []
            for index, batch in enumerate(self.train_loader, start=self.state.batch_in_epoch):
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

    # ------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Replicated parts (model, optimizer, scheduler, scaler) and this rank's own (train_state,
        rng). Under FSDP every rank must call it: model and optimizer are its shards (DTensors)."""
        from trainer.worker.checkpoint import capture_rng, model_optimizer_state

        model, optimizer = model_optimizer_state(self.model, self.raw_model, self.optimizer)
        if self.spec.checkpoint_keys is not None:  # e.g. LoRA: the adapters, not the frozen base
            model = {k: v for k, v in model.items() if self.spec.checkpoint_keys(k)}
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "train_state": dataclasses.asdict(self.state),
                "rng": capture_rng(), "goodput": self.goodput.state(self.state.step),
                "efficiency": {"flops_per_step": self.efficiency.flops_per_step}}

    def load_state_dict(self, state: dict) -> None:
        from trainer.worker.checkpoint import load_model_optimizer_state, restore_rng

        load_model_optimizer_state(self.model, self.raw_model, self.optimizer, state["model"], state["optimizer"],
                                   partial=self.spec.checkpoint_keys is not None)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        if "rng" in state:
            restore_rng(state["rng"])
        self._saved_goodput = state.get("goodput")  # None in checkpoints from before goodput
        # The FLOP count travels too: counting runs a step under FlopCounterMode, whose kernel choices can
        # differ in the last bits, and a resumed attempt must repeat the unbroken run's steps exactly.
        saved_flops = (state.get("efficiency") or {}).get("flops_per_step")
        if saved_flops is not None:
            self.efficiency.flops_per_step = float(saved_flops)

    def _log_step(self, step_loss: torch.Tensor) -> None:
        """training.stepLogFile: one JSON line per optimizer step (mean loss over ranks)."""
        loss = mean_across_ranks(step_loss.detach().clone()).item()
        if self.info.is_main:
            with open(self.cfg.step_log_file, "a") as f:
                f.write(json.dumps({"step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                                    "lr": self.scheduler.get_last_lr()[0], "time": round(time.time(), 3)}) + "\n")

    def fit(self) -> dict:
        from trainer.worker.checkpoint import CheckpointManager
        from trainer.worker.preemption import PreemptionWatch

        self.checkpoints = checkpoints = CheckpointManager(self.config, self.info, metrics=self.metrics)
        if checkpoints.enabled:  # the heartbeat lives beside the checkpoints
            self.goodput.store = checkpoints.store
            self.goodput.key = heartbeat_key(checkpoints.base, self.info.rank)
        preemption = PreemptionWatch(self.device).install()
        self.watchdog = HangWatchdog(self.cfg.distributed.hang_timeout_seconds)
        try:
            return self._fit(checkpoints, preemption, self.watchdog)
        finally:
            self.watchdog.stop()
            preemption.uninstall()
            self.tensorboard.close()

    def _training_phase(self) -> None:
        PHASES.enter("training", total=self.total_steps, unit="steps", done=self.state.step)

    def _fit(self, checkpoints, preemption, watchdog) -> dict:
        PHASES.enter("looking for a checkpoint to resume")
        resumed = checkpoints.resume(self)
        self.tensorboard.start(self.state.step)
        STARTUP.mark("resume")
        goodput = self.goodput
        goodput.add("startup", time.perf_counter() - STARTUP.origin)  # the rest of start-up is data wait
        if resumed is not None:
            goodput.resumed(self._saved_goodput, resumed)
        self._observe_goodput()
        watchdog.start()  # after the resume: downloading a checkpoint is not a hang
        self.model.train()
        self.window = window = LogWindow(self.device, self.cfg.log_every_steps, self.total_steps,
                                         self.samples_per_step, first_step=self.state.step)
        timer = StepTimer()
        self._training_phase()
        self.metrics.observe_run_start(self.total_steps, self.state.step, self.state.epoch)
        preempted = False
        if self.done:
            log.info("resumed at step %d of %d: nothing left to train", self.state.step, self.total_steps)
        for group in self._micro_batches() if not self.done else ():
            timer.batch_arrived()
            if group is None:  # an epoch ended
                if (self.state.epoch + 1) % self.cfg.eval_every_epochs == 0 or self.done:
                    started = time.perf_counter()
                    self._evaluate_and_report(announce=True)
                    goodput.add("evaluation", time.perf_counter() - started)
                    watchdog.beat("evaluation")
                timer.restart()
                if self.done:
                    break
                continue
            step_loss = self.train_step(group)
            window.add(step_loss, timer.since_arrival(), self.state.step)
            STARTUP.report(self.info.is_main)  # once: where the time to this first step went
            if self.cfg.step_log_file:
                self._log_step(step_loss)
            log_step = window.due(self.state.step)
            if log_step:
                self._report_window(window)
            # After the log step: its sync is where a GPU's queued work of the window is waited for.
            lap = timer.lap()
            goodput.step(*lap)
            self.metrics.observe_step(*lap, self.samples_per_step // self.info.world_size,
                                      self.scheduler.get_last_lr()[0], self.state.epoch)
            if log_step:
                self._observe_goodput()
                goodput.heartbeat(self.state.step)
            watchdog.beat(f"step {self.state.step}")
            PHASES.progress(self.state.step)
            preempted = preemption.should_stop()  # every rank, every step: agree on one boundary
            if preempted or self.done or self._checkpoint_due():
                PHASES.enter(f"checkpoint at step {self.state.step}")
                started = time.perf_counter()
                blocking = preempted or self.done or not checkpoints.async_save
                checkpoints.save(self, blocking=blocking)
                goodput.add("checkpoint_stall", time.perf_counter() - started)
                if blocking and checkpoints.enabled:  # committed: a stop now loses nothing after it
                    goodput.heartbeat(self.state.step, wait=True)
                self._training_phase()
                watchdog.beat(f"checkpoint at step {self.state.step}")
                timer.restart()
            if preempted and not self.done:
                if not checkpoints.enabled:
                    log.warning("preempted without checkpoint.uri: progress since the start is lost")
                break
            preempted = False
            if self.done and self.state.batch_in_epoch < self.steps_per_epoch * self.cfg.grad_accum_steps:
                started = time.perf_counter()
                self._evaluate_and_report(announce=False)  # maxSteps hit mid-epoch: evaluate once more
                goodput.add("evaluation", time.perf_counter() - started)
                break
        PHASES.enter("finishing the checkpoints")
        preemption.drain()
        started = time.perf_counter()
        checkpoints.close()
        goodput.add("checkpoint_stall", time.perf_counter() - started)
        if not preempted and self.done:
            from trainer.export import existing_export, export_model

            if self.state.step > window.first_step:
                PHASES.enter("exporting the model")
                exported = export_model(self)
                self.outputs = exported if isinstance(exported, dict) else {"model": exported} if exported else {}
            else:  # a rerun of a finished run: the export its first run wrote, if any
                self.outputs = existing_export(self)
        goodput.heartbeat(self.state.step, wait=True)
        report = self._observe_goodput()
        if self.info.is_main:
            log.info("%s", describe_goodput(report))
        return self.summary("preempted" if preempted else "succeeded")

    def _observe_goodput(self) -> dict:
        report = self.goodput.report()
        self.metrics.observe_goodput(report)
        self.tensorboard.log_goodput(self.state.step, report)
        return report

    def summary(self, status: str, error: str | None = None) -> dict:
        """The run's JSON summary as this rank sees it: what fit() returns, and what a failure reports
        (with the step reached, not 0). Unknown figures are None (null), never NaN."""
        window, checkpoints = self.window, self.checkpoints
        wall = time.perf_counter() - window.run_start if window else 0.0
        steps_run = self.state.step - window.first_step if window else 0
        committed = checkpoints.last_committed if checkpoints is not None else None
        goodput = self.goodput.report()
        return {
            "event": "summary",
            "status": status,
            "experiment": self.config.experiment,
            "steps": self.state.step,
            "epochs": self.state.epoch + (1 if self.state.batch_in_epoch else 0),
            "world_size": self.info.world_size,
            "train_loss": window.last_loss if window else None,
            "first_train_loss": self.history[0][1] if self.history else None,
            "eval_loss": self.eval_loss,
            "eval_accuracy": self.eval_accuracy,
            "samples_per_second": steps_run * self.samples_per_step / wall if wall > 0 else 0.0,
            # Real tokens of all ranks (token tasks only), and rank 0's MFU, over the same wall time.
            "tokens_per_second": window.run_tokens / wall if window and window.counts_tokens and wall > 0 else None,
            "mfu": self.efficiency.mfu(steps_run / wall) if wall > 0 else None,
            "wall_seconds": round(wall, 3),
            # Since the experiment's first start, across restarts (trainer/worker/goodput.py).
            "goodput": None if goodput["goodput"] is None else round(goodput["goodput"], 4),
            "experiment_seconds": round(goodput["wall"], 3),
            "productive_seconds": round(goodput["productive"], 3),
            "goodput_losses": {name: round(seconds, 3) for name, seconds in goodput["losses"].items()},
            "checkpoint": checkpoints.url(committed) if committed is not None else None,
            "model": self.outputs.get("model"),
            **({"adapter": self.outputs["adapter"]} if "adapter" in self.outputs else {}),
            "tensorboard": self.tensorboard.location or None,
            **({"error": error} if error else {}),
        }

    # ------------------------------------------------------------ what happens each step
    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint.every_steps
        return bool(every) and self.state.step % every == 0

    def _report_window(self, window: LogWindow) -> None:
        """A log step: the window's mean loss across ranks to the log, metrics and TensorBoard."""
        report = window.close(self.state.step)
        mfu = self.efficiency.mfu(report.steps_per_second)
        self.metrics.observe_log(report.train_loss, self.grad_norm)
        self.metrics.observe_efficiency(report.rank_tokens if window.counts_tokens else None, mfu,
                                        self.efficiency.flops_per_step, self.efficiency.gpu_stats())
        if not window.finite:
            first = window.first_nonfinite_step() or self.state.step
            raise TrainingDiverged(
                f"training diverged: the train loss became {report.train_loss} at step {first} (of "
                f"{self.total_steps}); a lower training.optimizer.lr ({self.cfg.optimizer.lr:g}) or "
                "training.gradClipNorm may keep it finite")
        self.history.append((self.state.step, report.train_loss))
        lr = self.scheduler.get_last_lr()[0]
        self.tensorboard.log_train(self.state.step, report.train_loss, lr, self.grad_norm,
                                   report.samples_per_second, self.tensorboard.step_times(report.step_seconds),
                                   report.tokens_per_second, mfu)
        if self.info.is_main:
            rates = "" if report.tokens_per_second is None else f" tokens/s {report.tokens_per_second:.0f}"
            rates += "" if mfu is None else f" mfu {mfu:.1%}"
            log.info("step %d/%d epoch %d loss %.4f lr %.3g samples/s %.0f%s eta %.0fs", self.state.step,
                     self.total_steps, self.state.epoch + 1, report.train_loss, lr, report.samples_per_second,
                     rates, report.eta_seconds)

    def _evaluate_and_report(self, announce: bool) -> None:
        self.eval_loss, self.eval_accuracy = self.evaluate()
        perplexity = (math.exp(min(self.eval_loss, 700.0))  # exp overflows past ~709
                      if self.spec.perplexity and self.eval_loss is not None else None)
        self.metrics.observe_eval(self.eval_loss, self.eval_accuracy)
        self.tensorboard.log_eval(self.state.step, self.eval_loss, self.eval_accuracy, perplexity)
        if announce and self.info.is_main:
            log.info("epoch %d eval: loss=%s accuracy=%s%s", self.state.epoch + 1, _fmt(self.eval_loss),
                     _fmt(self.eval_accuracy), "" if perplexity is None else f" perplexity={perplexity:.3f}")
        self._log_generations()

    def _log_generations(self) -> None:
        """The task's greedy answers to fixed eval prompts (language models), to the log and TensorBoard."""
        if self.spec.generate is None:
            return
        synced = is_fsdp(self.model) and dist.is_initialized()  # every rank joins the sharded forwards
        if not (synced or self.info.is_main):
            return
        self.raw_model.eval()
        with self._autocast():
            samples = self.spec.generate(self.raw_model, self.device, synced)
        self.model.train()
        if self.info.is_main and samples:
            for sample in samples:
                log.info("generation at step %d: %r -> %r (expected %r)", self.state.step, sample["prompt"],
                         sample["answer"], sample["expected"])
            self.tensorboard.log_generations(self.state.step, samples)


def log_parameter_counts(model: nn.Module, freeze: tuple[str, ...]) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("parameters: %d trainable, %d frozen%s", trainable, frozen,
             f" (training.finetune.freeze: {list(freeze)})" if freeze else "")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
