"""Which settings need the Hugging Face hub, and refusing them at once where a run is offline.

Without a route out, transformers retries its downloads for about a minute before it fails, after the
replicas have started. A run that says it is offline (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`, as
Hugging Face's libraries read them) can know at validation time that a hub name it was given will not
load: `kubetrain run` checks before any process starts (with the replicas' environment), the trainer
when it reads its config (in a pod). A name already in the local hub cache, or a local folder, loads
offline and passes. Standard library only: the CLI imports this (docs/architecture.md, the floors).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping

from trainer.errors import UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
BERT_DEFAULT_MODEL = "distilbert-base-uncased"  # bert-sentiment's options.model when unset
WEIGHTS_CACHE_ENV = "KUBETRAIN_WEIGHTS_CACHE"


def offline_var(env: Mapping[str, str]) -> str | None:
    """The variable that makes this environment offline, as huggingface_hub reads it (1/ON/YES/TRUE)."""
    return next((v for v in OFFLINE_VARS if env.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}), None)


def hub_cache(env: Mapping[str, str]) -> Path:
    """huggingface_hub's cache folder: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def weights_cache(uri: str, env: Mapping[str, str] = os.environ) -> Path:
    """Where a run keeps an s3:// or hf:// model folder on its node (trainer/tasks/_weights.py fetches it)."""
    root = Path(env.get(WEIGHTS_CACHE_ENV) or Path(tempfile.gettempdir()) / "kubetrain-weights")
    return root / hashlib.sha256(uri.encode()).hexdigest()[:20]


def cached(repo: str, cache: Path) -> bool:
    """Whether huggingface_hub's cache layout in `cache` holds a snapshot of model `repo` with its config."""
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any((s / "config.json").is_file() for s in snapshots.iterdir())


def hub_models(training, env: Mapping[str, str] = os.environ) -> list[tuple[str, str, str, Path]]:
    """(values key, hub model id, what it is for, the cache it would load from offline) of every model the
    config loads from the hub: an hf:// URI goes to the run's weights cache, a bare name to huggingface_hub's."""
    pretrained, options = training.pretrained, training.options or {}
    if isinstance(pretrained, str):
        key, source = "training.pretrained", pretrained  # file:// and s3:// are read through the run's storage
    elif training.task == "bert-sentiment":
        if "model" not in options and pretrained is False and training.data.source == "synthetic":
            return []  # built offline over the synthetic vocabulary (trainer/tasks/bert_sentiment.py)
        key = "training.pretrained" if pretrained and "model" not in options else "training.options.model"
        source = str(options.get("model", BERT_DEFAULT_MODEL))
        if source.startswith(("file://", "s3://")) or os.path.isdir(source):
            return []
    else:
        return []  # the other tasks take no hub model
    what = "model folder" if training.task != "bert-sentiment" else (
        "weights, tokenizer and config" if pretrained else "tokenizer and config")
    if source.startswith("hf://"):
        return [(key, source[len("hf://"):].partition("@")[0], what, weights_cache(source, env))]
    return [] if "://" in source else [(key, source, what, hub_cache(env))]


def require_reachable_models(training, env: Mapping[str, str] = os.environ) -> None:
    """Refuse, at validation time, a hub model that an offline run cannot load (exit 2, the key named)."""
    offline = offline_var(env)
    if offline is None:
        return
    for key, repo, what, cache in hub_models(training, env):
        if not cached(repo, cache):
            instead = "a file:// or s3:// folder written by save_pretrained" + (
                "" if training.task != "bert-sentiment" else
                ", or training.pretrained: false on synthetic data without training.options.model")
            raise UserError(f"{key}: {repo!r} needs its {what} from the Hugging Face hub, but {offline} is set "
                            f"and the cache {cache} does not hold it; set training.pretrained to {instead}, or fill "
                            f"that cache first")
