"""`python -m trainer --config FILE`: the in-pod entry point.

Resolves the rank contract, owns the process group, runs one Trainer and
prints the JSON summary as rank 0's last line. Exit codes are trainer/errors.py's (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from trainer import __version__
from trainer.errors import EXIT_FAILURE, EXIT_HANG, EXIT_OK, EXIT_PREEMPTED, RetryableError, UserError
from trainer.summary import to_json
from trainer.worker.host_memory import keep_freed_memory
from trainer.worker.startup import STARTUP, import_in_background

log = logging.getLogger("trainer")


def whole_line_output() -> None:
    """Every line reaches the pod log (or `kubetrain run`'s pipe) in one write(). torchrun's workers
    share the container's stdout, and unbuffered (PYTHONUNBUFFERED) print() writes a line's text and
    its newline separately, so another rank's output could land between them: glued lines, and a
    summary line nobody can parse. Line buffering makes each line one write, atomic on a pipe."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s rank={rank} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def failed_summary(trainer, experiment: str | None, error: str, started: float) -> dict:
    """A failure's summary: the trainer's own (the step it reached, its checkpoint) once one exists."""
    if trainer is not None:
        try:
            return trainer.summary("failed", error)
        except Exception:  # noqa: BLE001 - the failure's own report must not fail; the plain one follows
            log.warning("the trainer's summary failed; reporting without its figures", exc_info=True)
    return {
        "event": "summary", "status": "failed", "experiment": experiment, "steps": 0,
        "train_loss": None, "eval_loss": None, "eval_accuracy": None, "samples_per_second": 0.0,
        "wall_seconds": round(time.perf_counter() - started, 3), "checkpoint": None, "model": None,
        "tensorboard": None, "error": error,
    }


# Where Kubernetes reads a container's termination message (the pod's default terminationMessagePath);
# the variable is for tests. `kubetrain status` shows it beside a failed pod.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps


def report(summary: dict) -> None:
    """Rank 0 prints the summary as its last line; the first process of every container also leaves
    its own as the termination message, where the kubelet made that file (torchrun's other workers
    would overwrite it)."""
    line = to_json(summary)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(line, flush=True)
    path = os.environ.get("KUBETRAIN_TERMINATION_LOG", TERMINATION_LOG)
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0 or not os.access(path, os.W_OK):
        return
    if len(line.encode()) > TERMINATION_LIMIT and summary.get("error"):  # cut the error, keep valid JSON
        line = to_json({**summary, "error": summary["error"][:TERMINATION_LIMIT // 2] + " …"})
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        log.warning("could not write the termination message to %s: %s", path, e)


def run(config_path: str) -> int:
    host_memory = keep_freed_memory()  # before training allocates; DataLoader workers inherit it
    # Heavy imports happen here so `--help` and config errors answer fast.
    from trainer.config import describe_changes, load_trainer_config
    from trainer.hub import require_reachable_models
    from trainer.worker.distributed import (ProcessGroup, device_for, fit_threads_to_cpu_limit, log_rank_table,
                                            pick_backend, resolve_rank)
    from trainer.worker.loop import Trainer, TrainingDiverged
    from trainer.worker.metrics import DISABLED, MetricsProcessor
    from trainer.outputs import write_config
    from trainer.worker.phases import PHASES

    STARTUP.mark("imports")
    started = time.perf_counter()
    rank = int(os.environ.get("RANK", "0") or 0)
    whole_line_output()
    setup_logging(rank)
    if rank == 0:
        log.info("%s", host_memory)
    experiment, metrics, trainer = None, DISABLED, None
    try:
        config = load_trainer_config(config_path)
        experiment = config.experiment
        require_reachable_models(config.training)  # an offline pod: at once, not after a minute of retries
        info = resolve_rank()
        fit_threads_to_cpu_limit(info)
        backend = pick_backend(config.training.distributed.backend)
        device = device_for(info, backend)
        metrics = MetricsProcessor.from_config(config, info.local_rank, info.rank)
        metrics.start()
        metrics.describe_run(config, info.world_size, backend, __version__)
        STARTUP.mark("config and metrics")
        dynamo = import_in_background("torch._dynamo", device)  # the optimizer needs it; hide it behind the wait
        with ProcessGroup(info, backend, config.training.distributed.timeout_seconds):
            STARTUP.mark("rendezvous")
            log_rank_table(info, device, backend)
            if info.is_main:  # one line: what this run changed; the whole config goes to a file
                log.info("kubetrain %s, experiment %s; settings changed from the defaults: %s; the whole config: %s",
                         __version__, config.experiment, describe_changes(config) or "none", write_config(config))
            dynamo.join()
            with PHASES.watching(info.is_main):
                trainer = Trainer(config, info, device, metrics)
                STARTUP.mark("data and model")
                summary = trainer.fit()
        report(summary)
        if summary["status"] == "preempted":  # SIGTERM: the checkpoint is committed, restart resumes it
            metrics.close(wait_for_scrape=False)
            return EXIT_PREEMPTED
        return EXIT_OK
    except (UserError, TrainingDiverged) as e:  # not a code error: one line, no traceback
        log.error("%s", e)
        report(failed_summary(trainer, experiment, str(e), started))
        return e.exit_code
    except Exception as e:
        retryable = e if isinstance(e, RetryableError) else None
        if retryable is None and is_collective_failure(e):  # a peer died or hung: a restart, not the code, fixes it
            retryable = RetryableError(f"a collective failed: {str(e).splitlines()[0][:300]}", EXIT_HANG)
        if retryable is not None:
            metrics.close(wait_for_scrape=False)  # a preempted pod's grace period belongs to the checkpoint
            log.error("retryable: %s (exit %d)", retryable, retryable.exit_code)
            report(failed_summary(trainer, experiment, str(retryable), started))
            return retryable.exit_code
        # A code error: keep the traceback for the developer.
        log.exception("training failed")
        report(failed_summary(trainer, experiment, f"{type(e).__name__}: {e}", started))
        return EXIT_FAILURE
    finally:
        metrics.close()  # lets a scraping Prometheus take the final values (or the NaN loss) first


# What gloo and NCCL say when a peer is gone or a collective timed out (gloo raises a plain RuntimeError).
_COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                        "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COLLECTIVE_FAILURES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="kubetrain's in-pod trainer")
    parser.add_argument("--config", required=True, help="trainer config file (YAML or JSON)")
    parser.add_argument("--version", action="version", version=f"kubetrain {__version__}")
    args = parser.parse_args(argv)
    return run(args.config)
