"""Checkpoints (docs/architecture.md): `<uri>/<experiment>/step-<N:08d>/…`, commit marker last.

A step directory holds
  model.pt         rank 0: the model's state_dict (plain tensors; loadable on its own)
  train.pt         rank 0: optimizer, LR scheduler and grad-scaler state
  dcp/             FSDP instead of model.pt and the optimizer: every rank's shards
                   (`__<rank>_0.distcp`) and rank 0's index (`.metadata`), written
                   through torch.distributed.checkpoint (sharded_checkpoint.py)
  rank-<r:05d>.pt  every rank: its RNG states and data position (TrainState)
  commit.json      rank 0, written last after every rank reported its files
                   written: step, config hash, resolved config, file sizes, and
                   each file's SHA-256 (hashed from the bytes as they are written).
A step without commit.json does not exist: resume ignores it (and says so),
retention deletes it once a newer step is committed. Deleting a step removes
its marker first, so a crash mid-delete never leaves a committed partial step.
On resume every rank checks the files it reads (size, checksum, readable);
`resume: auto` skips a committed step that fails, on every rank alike, with a
warning and a `verify` failure metric, and loads the newest intact one.

Loading never unpickles objects: torch.load(weights_only=True) refuses anything
but tensors and plain containers, so a crafted checkpoint cannot run code (DCP's
pickled index goes through an allowlisting unpickler, see sharded_checkpoint.py).

Saving is synchronous, or with `checkpoint.asyncSave` a CPU snapshot is taken
at the step boundary and a background thread serialises, uploads and commits
while training continues; at most one save is in flight (the next save, the
final save and preemption wait for it). The commit protocol's collectives run
on a dedicated gloo group so they never interleave with the training's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import TrainerConfig, resume_shaping
from trainer.errors import EXIT_STORAGE_UNAVAILABLE, CorruptCheckpoint, RetryableError, UserError
from trainer.worker.distributed import RankInfo
from trainer.worker.sharded_checkpoint import DCP_DIR, is_sharded, load_sharded, save_sharded
from trainer.storage import Store, file_sha256, hash_while, open_store

log = logging.getLogger(__name__)

COMMIT = "commit.json"
MODEL, TRAIN = "model.pt", "train.pt"
STEP_DIR = re.compile(r"^step-(\d{8})/(.+)$")
# Fault injection for tests: after writing this rank's files, before the commit, wait while this file
# exists ("{step}" in it is the step): a gate the test opens, not a sleep a loaded machine can outlast.
PAUSE_BEFORE_COMMIT_ENV = "KUBETRAIN_TEST_PAUSE_BEFORE_COMMIT_WHILE"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ------------------------------------------------------------------ RNG and serialisation
def capture_rng() -> dict:
    """This process's RNG states as tensors and plain values (weights_only-loadable)."""
    state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": state[0], "keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
                  "has_gauss": int(state[3]), "cached_gaussian": float(state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_optimizer_state(model, raw_model, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state. DDP: the replica as is (plain tensors). FSDP: this rank's
    shards as DTensors keyed by parameter name, never gathered: the checkpoint manager saves
    them through torch.distributed.checkpoint. Every rank calls this."""
    if not _is_fsdp(model):
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)


def load_model_optimizer_state(model, raw_model, optimizer, model_state: dict, optimizer_state: dict,
                               partial: bool = False) -> None:
    """`partial`: the checkpoint holds part of the model (LoRA adapters); the rest stays as loaded at
    start, but every saved tensor must find its parameter."""
    if not _is_fsdp(model):
        result = raw_model.load_state_dict(model_state, strict=not partial)
        if partial and result.unexpected_keys:
            raise UserError(f"the checkpoint holds tensors this model lacks: {result.unexpected_keys[:5]}")
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    # Sharded state from DCP, or full plain tensors (a model.pt written by DDP or before sharded saves).
    options = StateDictOptions(full_state_dict=not is_sharded(model_state), strict=not partial)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, _keyed_by_name(raw_model, optimizer, optimizer_state),
                             options=options)


def _keyed_by_name(raw_model, optimizer, optimizer_state: dict) -> dict:
    """A DDP checkpoint keys optimizer state by parameter index (torch.optim's own format);
    FSDP's loader wants parameter names. Map index i to the i-th parameter this optimizer holds."""
    state = optimizer_state.get("state", {})
    if not state or not all(isinstance(k, int) for k in state):
        return optimizer_state
    names = {id(p): n for n, p in raw_model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {ordered[i]: v for i, v in state.items()},
            "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]}
                             for g in optimizer_state["param_groups"]]}


def cpu_snapshot(obj: Any) -> Any:
    """A deep copy with every tensor on CPU: what an async save uploads while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return obj


def safe_load(source: bytes | Path, where: str) -> Any:
    """torch.load (of bytes or a file) that only accepts tensors and plain containers: never runs
    pickled code."""
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {where}: not a plain tensor checkpoint, it may be corrupt or "
                        f"crafted to run code when unpickled ({first})") from None


def _dotted_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key.path: old -> new` for each value that differs, with the values file's camelCase names
    (a user's training.options keys as they are)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = key if prefix.startswith("training.options") else re.sub(r"_([a-z])", lambda m: m[1].upper(), key)
            out += _dotted_diff(old.get(key), new.get(key), f"{prefix}.{name}" if prefix else name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# ------------------------------------------------------------------ the manager
class CheckpointManager:
    """Saves and restores a Trainer's state under `<checkpoint.uri>/<experiment>/`."""

    def __init__(self, config: TrainerConfig, info: RankInfo, store: Store | None = None, metrics=None):
        self.config, self.cfg, self.info = config, config.checkpoint, info
        self.enabled = bool(self.cfg.uri)
        self.store = store or (open_store(self.cfg.uri, config.s3) if self.enabled else None)
        self.base = config.experiment
        self.metrics = metrics  # trainer/worker/metrics.py MetricsProcessor (observe_checkpoint_*)
        self.async_save = bool(getattr(self.cfg, "async_save", False))
        self.force = bool(getattr(self.cfg, "force", False))
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self.enabled:
            import datetime

            # Its own gloo group: commit collectives from the save thread never meet the training's.
            timeout = datetime.timedelta(seconds=config.training.distributed.timeout_seconds)
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: int | None = None
        self.loaded: tuple[int, float] = (0, 0.0)  # bytes and seconds of this rank's last load

    def url(self, step: int | None = None) -> str:
        key = self.base if step is None else f"{self.base}/{step_dir(step)}"
        return self.store.url(key) if self.store else ""

    # ------------------------------------------------------------ listing
    def scan(self) -> dict[int, dict[str, int]]:
        """step -> {file name: size} for every step directory under the experiment."""
        steps: dict[int, dict[str, int]] = {}
        for key, size in self.store.sizes(self.base).items():
            match = STEP_DIR.match(key[len(self.base) + 1:])
            if match:
                steps.setdefault(int(match.group(1)), {})[match.group(2)] = size
        return steps

    @staticmethod
    def committed(steps: dict[int, dict[str, int]]) -> list[int]:
        return sorted(s for s, files in steps.items() if COMMIT in files)

    # ------------------------------------------------------------ collectives on the checkpoint group
    def _all_ok(self, ok: bool) -> bool:
        if self.group is None:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # ------------------------------------------------------------ resume
    def resume(self, trainer) -> int | None:
        """Load the step that `checkpoint.resume` names into `trainer`; returns it, or None (fresh)."""
        if not self.enabled:
            return None
        decision = self._broadcast(self._decide() if self.info.is_main else None)
        kind, value = decision
        if kind == "retry":  # (why, exit code: 144, or 143 when SIGTERM stopped the store's waiting)
            raise RetryableError(*value)
        if kind == "user":
            raise UserError(value)
        if kind == "fresh":
            return None
        tried = []
        for step, files in value:  # newest first; an explicit step is the only one
            # Every rank learns every rank's outcome, so all go on (or stop) together.
            outcomes = [o for o in self._all_gather(self._try_load(trainer, step, files)) if o]
            for kind, message in outcomes:
                if kind == "retry":
                    raise RetryableError(*message)
                if kind == "user":
                    raise UserError(message)
            if not outcomes:  # every rank loaded this step
                nbytes, seconds = self.loaded
                self.last_committed = step
                if self.metrics is not None:
                    self.metrics.observe_checkpoint_load(seconds, nbytes)
                if self.info.is_main:
                    log.info("checkpoint: resumed from %s (step %d, %.1f MB in %.2fs)", self.url(step), step,
                             nbytes / 1e6, seconds)
                return step
            problem = outcomes[0][1]
            tried.append(f"step {step}: {problem}")
            if self.metrics is not None:
                self.metrics.observe_checkpoint_failure("verify")
            if self.cfg.resume != "auto":
                raise UserError(f"checkpoint.resume: {step}: {self.url(step)} fails verification: {problem}")
            if self.info.is_main:
                log.warning("checkpoint: skipping committed step %d (%s), which fails verification: %s",
                            step, self.url(step), problem)
        raise UserError(f"checkpoint.resume: auto: no intact committed step under {self.url()} "
                        f"(tried {'; '.join(tried)})")

    def _try_load(self, trainer, step: int, files: dict[str, int]) -> tuple[str, Any] | None:
        """None once loaded, else ("corrupt" | "user", why) or ("retry", (why, exit code))."""
        try:
            self._load(trainer, step, files)
        except CorruptCheckpoint as e:
            return ("corrupt", str(e))
        except RetryableError as e:
            return ("retry", (str(e), e.exit_code))
        except UserError as e:
            return ("user", str(e))
        return None

    def _decide(self) -> tuple[str, Any]:
        """Rank 0 picks the step every rank loads (or why not), from one listing."""
        mode = self.cfg.resume
        try:
            steps = self.scan()
        except RetryableError as e:
            if mode == "never":
                return ("fresh", None)
            return ("retry", (f"checkpoint.resume: {mode}: cannot list {self.url()} ({e}); refusing to start "
                              "fresh while committed checkpoints may exist", e.exit_code))
        except UserError as e:
            return ("user", str(e))
        committed = self.committed(steps)
        incomplete = sorted(set(steps) - set(committed))
        if incomplete:
            log.warning("checkpoint: ignoring incomplete steps %s under %s (no %s: a save was interrupted)",
                        incomplete, self.url(), COMMIT)
        if mode == "never":
            if committed:
                log.warning("checkpoint.resume: never: starting fresh although %s holds committed steps %s",
                            self.url(), committed)
            return ("fresh", None)
        if mode == "auto":
            if not committed:
                log.info("checkpoint: no committed step under %s: starting fresh", self.url())
                return ("fresh", None)
            return ("load", [(step, steps[step]) for step in reversed(committed)])
        step = int(mode)
        if step not in committed:
            return ("user", f"checkpoint.resume: {step}: no committed step {step} under {self.url()} "
                            f"(committed: {committed or 'none'})")
        return ("load", [(step, steps[step])])

    def _read(self, step: int, name: str) -> bytes:
        return self.store.read_bytes(f"{self.base}/{step_dir(step)}/{name}")

    def _verified(self, step: int, name: str, sums: dict[str, str]) -> tuple[Any, int]:
        """(the object in one file of the step, its size), once its bytes match the commit's checksum.
        The checksum is computed by a second thread while torch reads the same bytes; a local file is
        read in place, not copied into memory first."""
        where = f"{self.url(step)}/{name}"
        source: bytes | Path | None = self.store.local_path(f"{self.base}/{step_dir(step)}/{name}")
        if source is None:
            source = self._read(step, name)
            size, digest = len(source), lambda: hashlib.sha256(source).hexdigest()
        else:
            size, digest = source.stat().st_size, lambda: file_sha256(source)

        def load() -> tuple[Any, UserError | None]:
            try:
                return safe_load(source, where), None
            except UserError as e:  # judged after the checksum: a bit flip says "SHA-256", not "unreadable"
                return None, e

        actual, (obj, unreadable) = hash_while(digest, load)
        if name in sums and actual != sums[name]:
            raise CorruptCheckpoint(f"{name} fails its SHA-256 check (same size, other bytes)")
        if unreadable is not None:
            raise CorruptCheckpoint(f"{name} is unreadable: {unreadable}") from None
        return obj, size

    def _load(self, trainer, step: int, files: dict[str, int]) -> None:
        """Read and check every file this rank needs, then load them (CorruptCheckpoint: nothing loaded,
        except FSDP shards, which DCP loads in place and the next step tried overwrites)."""
        started = time.perf_counter()
        where = self.url(step)
        try:
            commit = json.loads(self._read(step, COMMIT))
        except ValueError as e:
            raise CorruptCheckpoint(f"{COMMIT} is unreadable: {e}") from None
        for name, size in commit.get("files", {}).items():
            if files.get(name) != size:
                raise CorruptCheckpoint(f"{name} is missing or has the wrong size ({files.get(name)} != {size} "
                                        "bytes)")
        sums = commit.get("sha256", {})  # absent in checkpoints from before checksums: sizes only
        ours = self.config.config_hash()
        if commit.get("config_hash") != ours:
            # Only what resuming depends on, compared as JSON: no `freeze: [] -> ()`, no metrics.port.
            changes = _dotted_diff(resume_shaping(commit.get("config", {})), resume_shaping(self.config.as_dict()),
                                   "training")
            detail = "; ".join(changes[:6]) + (" …" if len(changes) > 6 else "")
            if not self.force:
                raise UserError(
                    f"checkpoint {where} was made with a different config (hash {commit.get('config_hash')}, "
                    f"this run {ours}): {detail or 'unknown differences'}. Use another checkpoint.uri or "
                    "experiment name, or set checkpoint.force: true to load it anyway")
            log.warning("checkpoint.force: loading %s despite a config change: %s", where, detail)
        sharded = commit.get("format") == "dcp"
        # DCP loads into this rank's own (sharded) state in place: the trainer's state dict is the skeleton.
        skeleton = trainer.state_dict() if sharded else None
        if sharded and not is_sharded(skeleton["model"]):
            raise UserError(f"checkpoint {where} holds FSDP-sharded state (torch.distributed.checkpoint): "
                            "resume it with training.parallelism: fsdp on more than one process")
        train, nbytes = self._verified(step, TRAIN, sums)
        mine = rank_file(self.info.rank)
        if mine in files:
            rank_state, n = self._verified(step, mine, sums)
        else:  # the world grew: positions are shared, RNG starts from the seed
            log.warning("checkpoint %s has no %s (saved with world size %s): this rank's RNG is re-seeded",
                        where, mine, commit.get("world_size"))
            rank_state, n = self._verified(step, rank_file(0), sums)
            rank_state.pop("rng", None)
        nbytes += n
        if sharded:  # every rank reads the shards it needs into its own (sharded) state
            state = {"model": skeleton["model"], "optimizer": skeleton["optimizer"]}
            dcp_sums = {k[len(DCP_DIR) + 1:]: v for k, v in sums.items() if k.startswith(DCP_DIR + "/")}
            nbytes += load_sharded(self.store, f"{self.base}/{step_dir(step)}/{DCP_DIR}", state, self.group,
                                   dcp_sums)
            model, train["optimizer"] = state["model"], state["optimizer"]
        else:
            model, n = self._verified(step, MODEL, sums)
            nbytes += n
        if commit.get("world_size") != self.info.world_size:
            log.warning("checkpoint %s was saved by %s ranks, this run has %s: the data order of the "
                        "current epoch differs", where, commit.get("world_size"), self.info.world_size)
        trainer.load_state_dict({"model": model, **train, **rank_state})
        self.loaded = (nbytes, time.perf_counter() - started)

    # ------------------------------------------------------------ save
    def save(self, trainer, blocking: bool = False) -> None:
        """Save the trainer's state at its current step (all ranks call this at the same step)."""
        if not self.enabled:
            return
        self.wait()  # at most one save in flight
        state = trainer.state_dict()
        step = state["train_state"]["step"]
        model, optimizer = state.pop("model"), state.pop("optimizer")
        train = {k: state.pop(k) for k in ("scheduler", "scaler")}
        payload = {rank_file(self.info.rank): state}  # train_state + rng
        if is_sharded(model):  # FSDP: every rank writes its shards through DCP (key DCP_DIR)
            payload[DCP_DIR] = {"model": model, "optimizer": optimizer}
            if self.info.is_main:
                payload[TRAIN] = train
        elif self.info.is_main:
            payload[MODEL], payload[TRAIN] = model, {"optimizer": optimizer, **train}
        if self.async_save and not blocking:
            started = time.perf_counter()
            payload = cpu_snapshot(payload)
            log.debug("checkpoint: snapshot of step %d took %.3fs", step, time.perf_counter() - started)
            self._thread = threading.Thread(target=self._background, args=(step, payload),
                                            name=f"checkpoint-step-{step}", daemon=True)
            self._thread.start()
        else:
            self._write_step(step, payload)

    def _background(self, step: int, payload: dict) -> None:
        try:
            self._write_step(step, payload)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed and its retention done; re-raise a
        failed save."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._retention is not None:
            self._retention.join()
            self._retention = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_step(self, step: int, payload: dict) -> None:
        started = time.perf_counter()
        prefix = f"{self.base}/{step_dir(step)}"
        error: BaseException | None = None
        nbytes, sums = 0, {}
        sharded, dcp_files = payload.pop(DCP_DIR, None), None
        try:
            if self.info.is_main:  # re-saving a step (resume from an older one): uncommit it first
                self.store.delete([f"{prefix}/{COMMIT}"])
                if sharded is not None:  # and its old shards (maybe from another world size)
                    self.store.delete(list(self.store.sizes(f"{prefix}/{DCP_DIR}")))
        except BaseException as e:
            error = e
        if self._all_ok(error is None):
            try:
                if sharded is not None:  # a collective: every rank gets here (all_ok above)
                    written, names, shard_sums = save_sharded(self.store, f"{prefix}/{DCP_DIR}", sharded,
                                                              self.group, self.info.rank)
                    nbytes += written
                    dcp_files = [f"{DCP_DIR}/{name}" for name in names]
                    sums.update({f"{DCP_DIR}/{name}": digest for name, digest in shard_sums.items()})
                for name, obj in payload.items():
                    size, sums[name] = self.store.write_serialized(f"{prefix}/{name}",
                                                                   lambda f: torch.save(obj, f))
                    nbytes += size
                gate = os.environ.get(PAUSE_BEFORE_COMMIT_ENV, "").replace("{step}", str(step))
                if gate and os.path.exists(gate):
                    log.warning("checkpoint: fault injection: pausing before the commit of step %d while %s "
                                "exists", step, gate)
                    while os.path.exists(gate):
                        time.sleep(0.05)
            except BaseException as e:
                error = e
        if self._all_ok(error is None):
            every_rank = self._all_gather(sums)  # each rank's checksums, for the commit marker
            if self.info.is_main:
                try:
                    self._commit(step, prefix, dcp_files, {k: v for part in every_rank for k, v in part.items()})
                except BaseException as e:
                    error = e
        if not self._all_ok(error is None):
            if self.metrics is not None:
                self.metrics.observe_checkpoint_failure("save")
            if isinstance(error, (RetryableError, UserError)):
                raise error
            if error is not None:
                raise RetryableError(f"checkpoint step {step} to {self.url(step)} failed: "
                                     f"{type(error).__name__}: {error}", EXIT_STORAGE_UNAVAILABLE) from error
            raise RetryableError(f"checkpoint step {step} to {self.url(step)} failed on another rank "
                                 "(see its log)", EXIT_STORAGE_UNAVAILABLE)
        self.last_committed = step
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_checkpoint_save(seconds, nbytes, step)
        if self.info.is_main:
            log.info("checkpoint: committed %s (%.1f MB from rank 0 in %.2fs)", self.url(step), nbytes / 1e6,
                     seconds)

    def _commit(self, step: int, prefix: str, dcp_files: list[str] | None = None,
                sums: dict[str, str] | None = None) -> None:
        """Rank 0, after every rank wrote its files: the marker, then retention.
        `dcp_files`: the sharded checkpoint's files (DCP's index names them all), or None;
        `sums`: every rank's files' SHA-256."""
        steps = self.scan()
        files = steps.get(step, {})
        expected = {TRAIN, *(rank_file(r) for r in range(self.info.world_size)), *(dcp_files or [MODEL])}
        missing = expected - set(files)
        if missing:
            raise RetryableError(f"checkpoint step {step}: {sorted(missing)} not visible in {self.url(step)} "
                                 "after every rank wrote", EXIT_STORAGE_UNAVAILABLE)
        marker = {
            "step": step, "world_size": self.info.world_size, "time": time.time(),
            "format": "dcp" if dcp_files else "torch",
            "config_hash": self.config.config_hash(), "config": self.config.as_dict(),
            "files": {name: files[name] for name in sorted(expected)},
            "sha256": {name: (sums or {})[name] for name in sorted(expected) if name in (sums or {})},
        }
        self.store.write_bytes(f"{prefix}/{COMMIT}", json.dumps(marker, indent=1, default=str).encode())
        steps[step][COMMIT] = 0
        # Deleting old steps is no part of the commit, so it runs beside training (unlinking 200 MB
        # takes ~0.1 s on a local disk); wait() joins it before the next save and at the end.
        self._retention = threading.Thread(target=self._retain, args=(steps, step), daemon=True,
                                           name=f"checkpoint-retention-{step}")
        self._retention.start()

    def _retain(self, steps: dict[int, dict[str, int]], newest: int) -> None:
        """Keep the newest keepLast committed steps; drop older ones and stale incomplete ones.
        A failure only warns: the step is committed, and the next save's retention tries again."""
        committed = self.committed(steps)
        doomed = [s for s in committed[:-self.cfg.keep_last] if s != newest]
        doomed += [s for s in steps if COMMIT not in steps[s] and s < newest]
        try:
            for step in sorted(doomed):
                prefix = f"{self.base}/{step_dir(step)}"
                self.store.delete([f"{prefix}/{COMMIT}"])  # uncommit first: never a committed partial step
                self.store.delete([f"{prefix}/{name}" for name in steps[step] if name != COMMIT])
        except Exception as e:  # noqa: BLE001 - any store failure: the run goes on
            log.warning("checkpoint: retention (keepLast=%d) could not delete old steps under %s (%s: %s); the "
                        "next save tries again", self.cfg.keep_last, self.url(), type(e).__name__, e)
            return
        if doomed:
            log.info("checkpoint: retention (keepLast=%d) deleted steps %s", self.cfg.keep_last, sorted(doomed))

    def close(self) -> None:
        """Finish the save in flight; called before the process group goes away."""
        try:
            self.wait()
        finally:
            if self.group is not None:
                self.group = None
