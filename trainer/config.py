"""The trainer's typed config, built once from validated values.

The file that `python -m trainer --config FILE` reads is the `training`,
`checkpoint`, `s3` and `metrics` sections of the values plus the experiment
name. Chart defaults fill what the file leaves out, so a hand-written config
may be short; the result is validated with the same schema as the values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_origin, get_type_hints

import yaml

from trainer.chart import default_values, values_schema
from trainer.errors import UserError
from trainer.values import load_values_file, merge, validate

TRAINER_SECTIONS = ("training", "checkpoint", "s3", "metrics")
EXPERIMENT_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    weight_decay: float
    momentum: float


@dataclass(frozen=True)
class LrScheduleConfig:
    name: str
    warmup_steps: int
    min_lr_ratio: float


@dataclass(frozen=True)
class FinetuneConfig:
    freeze: tuple[str, ...]
    unfreeze_after_epochs: Optional[int] = None  # None: the frozen parameters never train
    backbone_lr_scale: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    source: str
    root: str
    download: bool
    train_samples: int
    eval_samples: int
    num_workers: int
    path: str = ""
    eval_path: str = ""
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    on_device: bool = False


@dataclass(frozen=True)
class DistributedConfig:
    backend: str
    timeout_seconds: int
    hang_timeout_seconds: int = 1800


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = True
    sync_seconds: int = 30


@dataclass(frozen=True)
class TrainingConfig:
    task: str
    entrypoint: str
    epochs: int
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    grad_clip_norm: float
    precision: str
    parallelism: str
    seed: int
    num_classes: Optional[int]  # None only for a custom task that leaves it unset
    pretrained: Union[bool, str]
    log_every_steps: int
    eval_every_epochs: int
    optimizer: OptimizerConfig
    lr_schedule: LrScheduleConfig
    finetune: FinetuneConfig
    data: DataConfig
    distributed: DistributedConfig
    options: dict = field(default_factory=dict)
    python_path: tuple[str, ...] = ()
    step_log_file: str = ""  # JSON lines, one per optimizer step, appended by rank 0
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    export_model: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    uri: str
    every_steps: int
    keep_last: int
    resume: Union[str, int]
    force: bool = False  # load a checkpoint made with a different config hash
    async_save: bool = False  # upload in a background thread; at most one save in flight


@dataclass(frozen=True)
class S3Config:
    endpoint: str
    region: str
    addressing_style: str
    credentials_secret: str


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool
    port: int


@dataclass(frozen=True)
class TrainerConfig:
    experiment: str
    training: TrainingConfig
    checkpoint: CheckpointConfig
    s3: S3Config
    metrics: MetricsConfig
    # The local run's directory (`kubetrain run` sets it): TensorBoard events and the exported model
    # go there; in a pod they go under <checkpoint.uri>/<experiment>/ instead.
    workdir: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A digest of what shapes the model and data, to refuse a mismatched resume."""
        t = self.as_dict()["training"]
        shaping = {k: t[k] for k in ("task", "entrypoint", "num_classes", "parallelism", "seed")}
        shaping["data"] = {k: t["data"][k] for k in ("source", "train_samples")}
        shaping["options"] = t["options"]
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _build(cls: type, data: dict) -> Any:
    """Build a frozen dataclass from a camelCase mapping (already schema-validated)."""
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = _snake(key)
        if name not in hints:
            continue  # keys the trainer does not use (e.g. chart-only settings)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif get_origin(hint) is tuple:
            value = tuple(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def check_experiment_name(name: str) -> None:
    """The chart's rule (`kubetrain.validate`): Services and pods are named after the experiment."""
    if not EXPERIMENT_NAME.match(name or ""):
        raise UserError(f"experiment name {json.dumps(name)} must be a DNS-1035 label: lowercase letters, digits "
                        "and '-', starting with a letter and ending with a letter or digit")


def trainer_config_from_values(experiment: str, values: dict) -> TrainerConfig:
    check_experiment_name(experiment)
    sections = {name: values[name] for name in TRAINER_SECTIONS}
    training = sections["training"]
    if training.get("numClasses") is None:
        sections["training"] = {**training, "numClasses": task_default(training["task"], "numClasses")}
    return _build(TrainerConfig, {"experiment": experiment, **sections})


def task_default(task: str, key: str):
    """A training setting's default for one task: the `default` its rule in values.schema.json gives
    (settings such as numClasses are null in values.yaml, meaning "the task's own")."""
    for rule in values_schema()["properties"]["training"].get("allOf", []):
        if rule["if"]["properties"].get("task", {}).get("const") == task:
            return rule["then"]["properties"].get(key, {}).get("default")
    return None


# Chart-only keys inside the trainer's sections: never in the trainer's config file
# (s3.devSecret holds credentials). The chart's configmap.yaml omits the same keys.
CHART_ONLY_KEYS = {"s3": ("devSecret",), "metrics": ("podMonitor", "prometheusRule", "dashboard")}


def trainer_config_document(experiment: str, values: dict) -> dict:
    """What the ConfigMap (or the local runner's workdir) holds for the trainer."""
    sections = {
        name: {k: v for k, v in values[name].items() if k not in CHART_ONLY_KEYS.get(name, ())}
        for name in TRAINER_SECTIONS
    }
    return {"experiment": experiment, **sections}


def load_trainer_config(path: str | Path) -> TrainerConfig:
    data = load_values_file(path)
    experiment = data.pop("experiment", None)
    workdir = data.pop("workdir", "")
    if not isinstance(experiment, str):
        raise UserError(f"{path}: `experiment` (the experiment name) is missing")
    defaults = {k: v for k, v in default_values().items() if k in TRAINER_SECTIONS}
    values = validate(merge(defaults, data), source=str(path))
    config = trainer_config_from_values(experiment, values)
    return dataclasses.replace(config, workdir=str(workdir)) if workdir else config


def dump_config(config: TrainerConfig) -> str:
    """The resolved config, whole, for the start-of-run log."""
    return yaml.safe_dump(config.as_dict(), sort_keys=False).rstrip()


