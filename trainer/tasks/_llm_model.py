"""causal-lm models: a save_pretrained folder checked, built without weights, then loaded where it lives.

The model is built with its parameters on the `meta` device (no memory, no init), LoRA adapters
are added by peft, and `materialize` then gives every parameter real storage on the training
device and reads only what this process holds from the folder's safetensors files: the whole
tensor for a replicated model (DDP, one process), and only this rank's rows for an FSDP shard
(safetensors reads a row slice without the rest). Peak host memory per process is then the
model divided by the world size plus one tensor, never a full copy. Buffers (rotary
frequencies) are real from the start and kept across the move. LoRA weights are initialised
from generators seeded by the run's seed and each parameter's name, so a sharded and a
replicated run start from the same adapters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
INDEX = "model.safetensors.index.json"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("training.task: causal-lm needs Hugging Face transformers and peft: "
                        "pip install 'kubetrain[nlp]'") from None
    return transformers


# ------------------------------------------------------------------ the folder
def check_folder(folder: Path, uri: str, key: str = "training.pretrained") -> dict[str, Path]:
    """Tensor name -> safetensors file, once the folder has a config, a tokenizer and weights."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}: {uri} has no config.json: not a save_pretrained model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{key}: {uri} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                        "tokenizer into the same folder (tokenizer.save_pretrained)")
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text()).get("weight_map", {})
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise UserError(f"{key}: {uri}: {INDEX} names shards that are missing: {', '.join(absent)}")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        binaries = sorted(p.name for p in folder.glob("*.bin"))
        raise UserError(f"{key}: {uri} has no *.safetensors weights" + (
            f" ({', '.join(binaries)} are pickles, which kubetrain does not load: convert them with "
            "save_pretrained(safe_serialization=True))" if binaries else ""))
    from safetensors import safe_open

    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            files.update({name: shard for name in f.keys()})
    return files


def load_tokenizer(folder: Path, uri: str):
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - a broken tokenizer folder is the user's to fix
        raise UserError(f"training.pretrained: {uri}: cannot load its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ------------------------------------------------------------------ building without weights
@contextlib.contextmanager
def parameters_on_meta():
    """Parameters go to the meta device as modules register them (buffers stay real), and no init
    function runs: building a model costs neither memory nor time."""
    from transformers.initialization import no_init_weights

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(folder: Path, uri: str):
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(str(folder))
    with parameters_on_meta():
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError as e:  # an architecture AutoModelForCausalLM does not know
            raise UserError(f"training.pretrained: {uri}: {str(e).splitlines()[0][:300]}") from None
    model.tie_weights()  # as from_pretrained does (e.g. Qwen2's lm_head is its embedding): one parameter
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, lora, key: str = "training.finetune.lora.targetModules"):
    """peft adapters on `lora.target_modules` (default: every linear layer but the output head)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("training.finetune.method: lora needs peft: pip install 'kubetrain[nlp]'") from None
    targets = list(lora.target_modules)
    if targets:
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            raise UserError(f"{key}: the model has no linear layer named {', '.join(unknown)}; its linear "
                            f"layers are {', '.join(linear_module_names(model))}")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets or "all-linear", task_type="CAUSAL_LM")
    with parameters_on_meta():
        return get_peft_model(model, config)


# ------------------------------------------------------------------ loading where the parameters live
def base_name(name: str) -> str:
    """A parameter's name in the pretrained folder: without peft's wrappers."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def _adapter_init(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """peft's defaults (A: Kaiming-uniform, B: zeros) from a generator of the seed and the name."""
    full = torch.zeros(shape)
    if ".lora_A." in name or ".lora_embedding_A." in name:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
    return full


def _local_rows(param) -> tuple[torch.Tensor, int]:
    """(the tensor this rank holds, the first row of the full tensor it starts at)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    mesh = param.device_mesh
    chunk = math.ceil(param.shape[0] / mesh.size())  # FSDP2 shards dim 0 as torch.chunk does
    return local, min(mesh.get_local_rank() * chunk, param.shape[0])


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (tied ones have several)."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return aliases


@torch.no_grad()
def materialize(model: nn.Module, files: dict[str, Path], device: torch.device, seed: int, uri: str) -> int:
    """Give the meta parameters storage on `device` and fill what this process holds; returns the
    bytes read from the folder."""
    from safetensors import safe_open

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    # Every name of each parameter, keyed by the one named_parameters() gives (tied ones have several).
    aliases = {names[0]: names for names in _aliases(model).values()}
    model.to_empty(device=device)
    for names in aliases.values():  # to_empty gives each module a parameter of its own: tie them again
        keep = model.get_parameter(names[0])
        for other in names[1:]:
            if model.get_parameter(other) is not keep:  # FSDP keeps one shared parameter itself
                owner, _, attr = other.rpartition(".")
                setattr(model.get_submodule(owner), attr, keep)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
    missing, nbytes = [], 0
    for name, param in model.named_parameters():
        source = next((base_name(n) for n in aliases[name] if base_name(n) in files), None)
        if source is not None:
            by_file.setdefault(files[source], []).append((source, param))
        elif is_adapter(name):
            local, start = _local_rows(param)
            local.copy_(_adapter_init(name, param.shape, seed)[start:start + local.shape[0]])
        else:
            missing.append(base_name(name))
    if missing:  # before reading anything
        raise UserError(f"training.pretrained: {uri} lacks {len(missing)} of the model's tensors: "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    # One file open at a time: its mapped pages count as this process's memory while it is read.
    for path, params in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for source, param in params:
                local, start = _local_rows(param)
                rows = handle.get_slice(source)
                if list(rows.get_shape()) != list(param.shape):
                    raise UserError(f"training.pretrained: {uri}: {source} has shape {rows.get_shape()}, the "
                                    f"model's config makes it {list(param.shape)}")
                data = rows[start:start + local.shape[0]] if local.dim() else rows[...]
                nbytes += data.numel() * data.element_size()
                local.copy_(data)
    return nbytes


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
