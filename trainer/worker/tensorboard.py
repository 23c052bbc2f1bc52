"""TensorBoard event files from rank 0, through `torch.utils.tensorboard`.

Scalars, with the optimizer step as x axis: `train/loss` (mean over ranks and
the log window), `train/learning_rate`, `train/grad_norm`,
`train/samples_per_second`, `train/tokens_per_second` (token tasks),
`train/mfu` (rank 0's, where a peak is known), `step_time_seconds/rank_N` (each rank's mean
compute time per step, data wait excluded), `eval/loss` and `eval/accuracy`;
the resolved config as text. Written at log steps only, where the loop has
synchronised anyway, so the cost is a few queued protobufs per log window.

Events go where run_outputs() says: written in place in a directory (the
local workdir, a file:// checkpoint.uri), or written to a local folder and
copied to S3 by a background thread every `syncSeconds` and at the end. A
resumed run passes the step after its checkpoint as `purge_step`, so
TensorBoard drops the points a preempted attempt logged after that checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import TrainerConfig, dump_config
from trainer.worker.distributed import RankInfo
from trainer.outputs import NOWHERE, TENSORBOARD_DIR, has_outputs, run_outputs

log = logging.getLogger(__name__)


class EventSync:
    """Copies the event files of a local folder to a store, file by file, when they grew."""

    def __init__(self, local: Path, store, prefix: str, every_seconds: int):
        self.local, self.store, self.prefix = local, store, prefix
        self.every = every_seconds
        self.sent: dict[str, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tensorboard-sync", daemon=True)

    def start(self) -> "EventSync":
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            self.sync()

    def sync(self) -> None:
        for path in sorted(self.local.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(self.local).as_posix()
            size = path.stat().st_size
            if self.sent.get(name) == size:
                continue
            try:
                self.store.write_file(f"{self.prefix}/{name}", path)
                self.sent[name] = size
            except Exception as e:  # the next sync retries; TensorBoard is never worth a failed run
                log.warning("tensorboard: cannot copy %s to %s: %s", name, self.store.url(self.prefix), e)
                return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sync()


class TensorBoardLogger:
    """Every rank holds one (the per-rank step time is a collective); only rank 0 writes. Enabled only
    where the events have a place to go, so no rank gathers step times (or the loop a grad norm) for
    events nobody writes; the same on every rank, as it depends on the config alone."""

    def __init__(self, config: TrainerConfig, info: RankInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        self.enabled = config.training.tensorboard.enabled and has_outputs(config)
        self.writer = None
        self.sync: EventSync | None = None
        self.location = ""

    def start(self, start_step: int) -> None:
        if not self.info.is_main:
            return
        if not self.enabled:
            if self.config.training.tensorboard.enabled:
                log.info("tensorboard: off, %s", NOWHERE)
            return
        from torch.utils.tensorboard import SummaryWriter

        place = run_outputs(self.config)
        local = place.local_dir(TENSORBOARD_DIR)
        if local is None:  # S3: a local folder, copied up
            local = Path(tempfile.mkdtemp(prefix="kubetrain-tensorboard-"))
            self.sync = EventSync(local, place.store, place.key(TENSORBOARD_DIR),
                                  self.config.training.tensorboard.sync_seconds).start()
        self.location = place.url(TENSORBOARD_DIR)
        # A resumed attempt starts after step `start_step`: TensorBoard drops what an earlier attempt
        # logged beyond it (the preempted attempt ran past its last checkpoint).
        self.writer = SummaryWriter(log_dir=str(local), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=min(30, self.config.training.tensorboard.sync_seconds),
                                    filename_suffix=f".rank{self.info.rank}")
        if not start_step:
            self.writer.add_text("config", "```\n" + dump_config(self.config) + "\n```", 0)
        log.info("tensorboard: events in %s", self.location)

    def step_times(self, seconds: float) -> list[float]:
        """Each rank's mean step time over the window (a gather, on every rank)."""
        if not self.enabled:
            return []
        mine = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [seconds]
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return [t.item() for t in gathered]

    def log_train(self, step: int, loss: float, lr: float, grad_norm: torch.Tensor | None,
                  samples_per_second: float, step_times: list[float], tokens_per_second: float | None = None,
                  mfu: float | None = None) -> None:
        if self.writer is None:
            return
        add = self.writer.add_scalar
        add("train/loss", loss, step)
        add("train/learning_rate", lr, step)
        if grad_norm is not None:
            add("train/grad_norm", float(grad_norm), step)
        add("train/samples_per_second", samples_per_second, step)
        if tokens_per_second is not None:
            add("train/tokens_per_second", tokens_per_second, step)
        if mfu is not None:
            add("train/mfu", mfu, step)
        for rank, seconds in enumerate(step_times):
            add(f"step_time_seconds/rank_{rank}", seconds, step)

    def log_goodput(self, step: int, report: dict) -> None:
        """Goodput since the experiment's first start, and its losses in seconds (trainer/worker/goodput.py)."""
        if self.writer is None:
            return
        if report["goodput"] is not None:
            self.writer.add_scalar("goodput/ratio", report["goodput"], step)
        self.writer.add_scalar("goodput/productive_seconds", report["productive"], step)
        for reason, seconds in report["losses"].items():
            self.writer.add_scalar(f"goodput/loss_seconds/{reason}", seconds, step)

    def log_eval(self, step: int, loss: float | None, accuracy: float | None,
                 perplexity: float | None = None) -> None:
        if self.writer is None:
            return
        if loss is not None:
            self.writer.add_scalar("eval/loss", loss, step)
        if perplexity is not None:
            self.writer.add_scalar("eval/perplexity", perplexity, step)
        if accuracy is not None:
            self.writer.add_scalar("eval/accuracy", accuracy, step)

    def log_generations(self, step: int, samples: list[dict]) -> None:
        """A language model's greedy answers to fixed eval prompts, as one Markdown table."""
        if self.writer is None:
            return
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        rows = [f"| {cell(s['prompt'])} | {cell(s['answer'])} | {cell(s['expected'])} |" for s in samples]
        self.writer.add_text("eval/generations", "| prompt | answer | expected |\n|---|---|---|\n" + "\n".join(rows),
                             step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
