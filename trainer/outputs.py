"""Where a run's outputs other than checkpoints go: TensorBoard events and the exported model.

A local run (`kubetrain run`) keeps them in its workdir. In a pod the workdir is
gone with the pod, so they go next to the checkpoints, under
`<checkpoint.uri>/<experiment>/`, where `kubetrain tensorboard` and a user's
inference code find them. A run with neither (a pod without checkpoint.uri, a
Trainer built in a script) has nowhere durable: it writes neither, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainerConfig, dump_config
from trainer.storage import FileStore, Store, open_store

@dataclass(frozen=True)
class OutputPlace:
    store: Store
    prefix: str  # key prefix below the store: "" or the experiment name

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def local_dir(self, *parts: str) -> Path | None:
        """The directory itself when the store is a local one (written in place, no copies)."""
        if isinstance(self.store, FileStore):
            return self.store.root.joinpath(self.key(*parts))
        return None

    def url(self, *parts: str) -> str:
        return self.store.url(self.key(*parts))


log = logging.getLogger(__name__)

NOWHERE = "no checkpoint.uri (nor a local run's workdir) to keep it in"
# The folders below the place: for the trainer that writes them and `kubetrain tensorboard` that reads.
TENSORBOARD_DIR, MODEL_DIR, CONFIG_FILE = "tensorboard", "model", "config.yaml"


def has_outputs(config: TrainerConfig) -> bool:
    """Whether run_outputs() has a place, without opening its store: every rank can ask cheaply."""
    return bool(config.workdir or config.checkpoint.uri)


def run_outputs(config: TrainerConfig) -> OutputPlace | None:
    if config.workdir:
        return OutputPlace(FileStore(Path(config.workdir).resolve().as_uri()), "")
    if config.checkpoint.uri:
        return OutputPlace(open_store(config.checkpoint.uri, config.s3), config.experiment)
    return None


def write_config(config: TrainerConfig) -> str:
    """The resolved config, whole, as `config.yaml` beside the other outputs (rank 0, at the start);
    where it went, for the start-of-run log line (TensorBoard's config text holds it too)."""
    place = run_outputs(config)
    if place is None:
        return f"not written, {NOWHERE}"
    try:
        place.store.write_bytes(place.key(CONFIG_FILE), (dump_config(config) + "\n").encode())
    except Exception as e:  # a copy for the user: never worth a failed run (checkpoints report the store)
        log.warning("cannot write %s: %s", place.url(CONFIG_FILE), e)
    return place.url(CONFIG_FILE)
