"""The trained model for inference: `model.safetensors` plus `model.json`, apart from the checkpoints.

At the end of a successful run rank 0 writes both under `<outputs>/model/`
(trainer/outputs.py: the local run's workdir, else
`<checkpoint.uri>/<experiment>/`). `model.json` holds the training section
needed to rebuild the network (task, entry point, class count, options) and
the run's final eval figures; it is written last, so a folder with it is
whole. Under FSDP the full state is gathered once, parameter by parameter,
into rank 0's CPU memory: no rank holds a second copy of the model on its
device, and the other ranks hold nothing.

Loading reads safetensors only, so nothing is unpickled:

    from trainer.export import load_exported
    exported = load_exported(".kubetrain/runs/quickstart/model")   # or s3://bucket/prefix/EXPERIMENT/model
    logits = exported.model(inputs)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from trainer import __version__
from trainer.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "kubetrain-model/1"
WEIGHTS, METADATA = "model.safetensors", "model.json"


# ------------------------------------------------------------------ writing (in the trainer)
def full_state_dict(model: nn.Module, raw_model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Unprefixed parameter and buffer tensors on CPU; a collective under FSDP (every rank calls it),
    {} on ranks other than 0 then."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return {}
    return {k: v.detach().cpu() for k, v in raw_model.state_dict().items()}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): copy all but the first."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if ident in seen and tensor.numel() else tensor
        seen.add(ident)
    return out


def export_model(trainer) -> str | None:
    """Write the export (rank 0) with the trainer's last eval figures and return its URL; None where
    disabled or not rank 0. Every rank calls it: under FSDP the gather is a collective."""
    from safetensors.torch import save_file

    from trainer.outputs import MODEL_DIR, NOWHERE, has_outputs, run_outputs

    if not (trainer.cfg.export_model and has_outputs(trainer.config)):
        if trainer.cfg.export_model and trainer.info.is_main:
            log.info("export: skipped, %s", NOWHERE)
        return None
    state = full_state_dict(trainer.model, trainer.raw_model, trainer.info.is_main)
    if not trainer.info.is_main:
        return None
    place = run_outputs(trainer.config)  # rank 0 alone opens the store
    if trainer.spec.export is not None:
        return _export_folders(trainer, state, place)
    training = dataclasses.asdict(trainer.cfg)
    metadata = {
        "format": FORMAT, "kubetrain_version": __version__, "experiment": trainer.config.experiment,
        "step": trainer.state.step, "task": trainer.cfg.task, "weights": WEIGHTS,
        "eval_loss": trainer.eval_loss, "eval_accuracy": trainer.eval_accuracy,
        "parameters": sum(t.numel() for t in state.values()), "training": training,
    }
    with tempfile.TemporaryDirectory(prefix="kubetrain-export-") as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(_unshared(state), str(weights), metadata={"format": FORMAT})
        del state
        place.store.write_file(place.key(MODEL_DIR, WEIGHTS), weights)
    place.store.write_bytes(place.key(MODEL_DIR, METADATA), (json.dumps(metadata, indent=2) + "\n").encode())
    url = place.url(MODEL_DIR)
    log.info("exported the model (%d parameters) to %s", metadata["parameters"], url)
    return url


def existing_export(trainer) -> dict[str, str]:
    """{name: URL} of the export folders a finished run left (rank 0; {} elsewhere or where none is):
    what a rerun that has nothing left to train names. A folder counts once its metadata, written
    last (model.json, config.json, adapter_config.json), is there."""
    from trainer.outputs import MODEL_DIR, has_outputs, run_outputs

    if not (trainer.info.is_main and has_outputs(trainer.config)):
        return {}
    place = run_outputs(trainer.config)
    found = {}
    for name in (MODEL_DIR, "adapter"):
        folder = place.key(name)
        if any(key.rpartition("/")[2] in (METADATA, "config.json", "adapter_config.json")
               for key in place.store.sizes(folder)):
            found[name] = place.url(name)
    return found


def _export_folders(trainer, state: dict, place) -> dict[str, str]:
    """The task's own export (a Hugging Face folder, a LoRA adapter beside it), written locally and
    copied to the outputs' place; {name: URL}. Each folder's files are uploaded in name order with
    the index and config last, so a reader that sees config.json sees whole weights."""
    with tempfile.TemporaryDirectory(prefix="kubetrain-export-") as tmp:
        folders = trainer.spec.export(state, Path(tmp))
        del state
        urls = {}
        last = (".json", ".jinja", ".txt", ".model")  # metadata after the weights, config.json at the end
        for name, folder in folders.items():
            files = sorted((p for p in folder.rglob("*") if p.is_file()),
                           key=lambda p: (p.name == "config.json", p.name.endswith(last), str(p)))
            for path in files:
                place.store.write_file(place.key(name, str(path.relative_to(folder))), path)
            urls[name] = place.url(name)
            log.info("exported the %s to %s (%d files, %.1f MB)", name, urls[name], len(files),
                     sum(p.stat().st_size for p in files) / 1e6)
    return urls


# ------------------------------------------------------------------ reading (anywhere)
class ExportedModel:
    """`model`: the network with the export's weights, in eval mode, on CPU; `metadata`: model.json.
    `spec`: the task's TaskSpec for evaluation (eval_dataset, collate_fn, loss_fn), built on first
    use only: loading a model needs the network alone, not the training data."""

    def __init__(self, model: nn.Module, metadata: dict, build):
        self.model, self.metadata, self._build = model, metadata, build

    @functools.cached_property
    def spec(self):
        from trainer.tasks import build_mode

        with build_mode(weights=False):
            spec = self._build()
        spec.model = self.model
        return spec


def _local_folder(where: str | Path, s3=None) -> Path:
    """The export's folder here: a path as given, or a file:// or s3:// URI through the weights
    fetcher (an s3:// one is downloaded)."""
    text = str(where)
    scheme = urlparse(text).scheme
    if scheme not in ("", "file", "s3"):
        raise UserError(f"{where}: a folder, file:// or s3:// URI of a model export")
    if scheme:
        from trainer.tasks._weights import WeightsReader

        folder = WeightsReader(s3).fetch_directory(text.rstrip("/"), "model export")
    else:
        folder = Path(text)
    if not (folder / METADATA).is_file():
        raise UserError(f"{where}: no {METADATA} here (not a kubetrain model export)")
    return folder


def load_exported(where: str | Path, s3=None) -> ExportedModel:
    """Rebuild the task's network from model.json and load model.safetensors into it (strict).

    `where` is the export folder, or a file:// or s3:// URI of it; `s3` an S3Config for a
    non-AWS endpoint (boto3 also reads AWS_ENDPOINT_URL and the AWS_* credentials)."""
    from safetensors.torch import load_file

    from trainer.config import TrainingConfig, _build
    from trainer.tasks import build_mode, get_task
    from trainer.tasks._weights import WeightsReader

    folder = _local_folder(where, s3)
    metadata = json.loads((folder / METADATA).read_text())
    if metadata.get("format") != FORMAT:
        raise UserError(f"{where}: {METADATA} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    cfg = _build(TrainingConfig, metadata["training"])

    def build():  # training.pretrained stays: bert reads its config and tokenizer there (offline)
        return get_task(cfg.task)(cfg, weights=WeightsReader(s3))

    # The weights are all here: the bare network, without the datasets or the pretrained weights.
    with build_mode(data=False, weights=False):
        model = build().model
    model.load_state_dict(load_file(str(folder / metadata["weights"])), strict=True)
    model.eval()
    return ExportedModel(model=model, metadata=metadata, build=build)
