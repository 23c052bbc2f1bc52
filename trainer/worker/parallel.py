"""Data parallelism: DDP (replicated model) or FSDP2 (sharded model).

FSDP follows torchtitan: `fully_shard` on every block, then on the root, so
each block's parameters are all-gathered just before its forward/backward and
freed after. Blocks come from the task (`TaskSpec.shard_units`) or, by default,
from the model's `nn.ModuleList`s (transformer layers, residual stacks). On GPU
with `training.precision: bf16`, a MixedPrecisionPolicy computes in bf16 and
reduces gradients in fp32, replacing autocast. On CPU, FSDP runs over gloo.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.errors import UserError

log = logging.getLogger(__name__)


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost nn.ModuleLists: a model's repeated blocks."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(m for m in child if any(True for _ in m.parameters()))
            else:
                visit(child)

    visit(model)
    return units


def fsdp_mixed_precision(precision: str, device: torch.device) -> bool:
    """Whether FSDP's MixedPrecisionPolicy (not autocast) handles bf16 for this run."""
    return precision == "bf16" and device.type == "cuda"


def _shard(model: nn.Module, units: Iterable[nn.Module], precision: str, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if fsdp_mixed_precision(precision, device):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = list(units)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)  # the root: whatever no block owns (embeddings, head)
    log.info("fsdp: sharded %d blocks + root over %d ranks%s", len(units), dist.get_world_size(),
             " (bf16 params, fp32 reduce)" if kwargs else "")
    return model


def parallelize(model: nn.Module, spec, cfg, world_size: int, device: torch.device) -> nn.Module:
    """The model the loop trains: FSDP-sharded, DDP-wrapped or as is (one process).

    FSDP shards in place (the returned module is `model`); DDP returns a wrapper.
    """
    if cfg.parallelism == "fsdp":
        if cfg.precision == "fp16":
            raise UserError("training.precision: fp16 is not supported with training.parallelism: fsdp; "
                            "use bf16 (or fp32)")
        if world_size == 1:
            log.info("fsdp with one process: nothing to shard, training the plain model")
            return model
        units = spec.shard_units(model) if spec.shard_units else default_shard_units(model)
        return _shard(model, units, cfg.precision, device)
    if world_size > 1:
        return ddp(model, device)
    return model


def ddp(model: nn.Module, device: torch.device) -> DDP:
    """DDP registers the parameters that require grad *now*: re-wrap after unfreezing.

    gradient_as_bucket_view: once DDP has averaged a gradient into its all-reduce bucket, the
    parameter's .grad *is* that slice of the bucket, so a step holds one gradient-sized buffer
    instead of two. zero_grad(set_to_none=True) and clip_grad_norm_ work on the views as they are.
    """
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def run_epoch_start_hook(spec, model: nn.Module, raw_model: nn.Module, device: torch.device,
                         epoch: int) -> nn.Module:
    """Call the task's on_epoch_start; returns the model to train (re-wrapped if needed).

    The hook may flip requires_grad (unfreezing a backbone). Under FSDP the flags
    must land on the sharded parameters, which the optimizer holds: a module left
    unsharded (the root after an eval forward) exposes its unsharded copies
    instead, so reshard first. DDP only reduces the parameters that required grad
    when it was built: re-wrap it. FSDP2 and a plain module notice on the next backward.
    """
    if is_fsdp(model):
        for module in model.modules():
            if is_fsdp(module):
                module.reshard()
    if not spec.on_epoch_start(raw_model, epoch):
        return model
    if isinstance(model, DDP):
        model = ddp(raw_model, device)
    return model.train()


def gradient_sync(model: nn.Module, enabled: bool):
    """A context in which backward does (or skips) the gradient collective, for accumulation."""
    if enabled:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if isinstance(model, DDP):
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)  # reduce-scatter only on the last micro-batch
    return contextlib.nullcontext()


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def even_eval_batches(loader, model: nn.Module) -> Iterator[tuple[object, bool]]:
    """(batch, counts) pairs. Under FSDP every forward is a collective, so a rank whose
    eval shard has fewer batches repeats a batch (counts=False, to be discarded)
    until all ranks have run the same number of forwards."""
    if not is_fsdp(model) or not dist.is_initialized():
        for batch in loader:
            yield batch, True
        return
    count = torch.tensor([len(loader)], dtype=torch.int64)
    most = count.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    filler = None
    for batch in loader:
        filler = batch
        yield batch, True
    if filler is None and int(most) > 0:
        from torch.utils.data import DataLoader  # this rank's shard is empty: borrow any item

        filler = next(iter(DataLoader(loader.dataset, batch_size=1, collate_fn=loader.collate_fn)))
    for _ in range(int(most) - int(count)):
        yield filler, False

