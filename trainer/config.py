"""The trainer's typed config, built once from validated values.

The file that `python -m trainer --config FILE` reads is the `training`,
`checkpoint`, `s3` and `metrics` sections of the values plus the experiment
name. Chart defaults fill what the file leaves out, so a hand-written config
may be short; the result is validated with the same schema as the values.
The section types are the values model's own (trainer/values_model.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml

from trainer.chart import chart_message, default_values
from trainer.errors import UserError
from trainer.values import load_values_file, merge, validate
from trainer.values_model import TASK_RULES, CheckpointConfig, MetricsConfig, S3Config, TrainingConfig, chart_only_keys

TRAINER_SECTIONS = ("training", "checkpoint", "s3", "metrics")
EXPERIMENT_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


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
        """The config as the trainer uses it: chart-only settings (s3.devSecret, ...) left out."""
        out = dataclasses.asdict(self)
        for section, keys in CHART_ONLY_KEYS.items():
            for key in keys:
                out[section].pop(_snake(key))
        return out

    def config_hash(self) -> str:
        """A digest of what shapes the model and data, to refuse a mismatched resume."""
        return hashlib.sha256(json.dumps(resume_shaping(self.as_dict()), sort_keys=True).encode()).hexdigest()[:16]


def resume_shaping(config: dict) -> dict:
    """The settings a checkpoint must share with the run that resumes it, from an as_dict() (or the copy
    a commit marker keeps), as JSON values: `freeze: ()` and a marker's `[]` are the same setting."""
    t = config.get("training") or {}
    keys = ("task", "entrypoint", "num_classes", "parallelism", "seed")
    shaping = {k: t.get(k) for k in keys}
    shaping["data"] = {k: (t.get("data") or {}).get(k) for k in ("source", "train_samples")}
    shaping["options"] = t.get("options")
    if t.get("task") == "causal-lm":  # the base weights and the adapters' shape decide what a step holds
        finetune = t.get("finetune") or {}
        shaping.update(pretrained=t.get("pretrained"), finetune={k: finetune.get(k) for k in ("method", "lora")})
    return json.loads(json.dumps(shaping, default=str))


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
        raise UserError(chart_message("experimentName", name or ""))


def trainer_config_from_values(experiment: str, values: dict) -> TrainerConfig:
    check_experiment_name(experiment)
    sections = {name: values[name] for name in TRAINER_SECTIONS}
    training = sections["training"]
    if training.get("numClasses") is None:
        # null in values.yaml means the task's own head size
        sections["training"] = {**training, "numClasses": TASK_RULES[training["task"]].num_classes}
    return _build(TrainerConfig, {"experiment": experiment, **sections})


# Chart-only keys inside the trainer's sections: never in the trainer's config file
# (s3.devSecret holds credentials). The chart's configmap.yaml omits the same keys.
CHART_ONLY_KEYS = chart_only_keys()


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
    # The chart's defaults under the file: the trainer reads its own sections, and the schema wants every one.
    values = validate(merge(default_values(), data), source=str(path))
    config = trainer_config_from_values(experiment, values)
    return dataclasses.replace(config, workdir=str(workdir)) if workdir else config


def dump_config(config: TrainerConfig) -> str:
    """The resolved config, whole: TensorBoard's config text and the run's config.yaml."""
    return yaml.safe_dump(config.as_dict(), sort_keys=False).rstrip()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{_camel(key)}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def changed_settings(config: TrainerConfig) -> dict[str, Any]:
    """{values key: value} of the trainer's settings that differ from the chart's defaults, in config
    order: the start-of-run log names these, the whole config goes to a file."""
    defaults = trainer_config_from_values(config.experiment, validate(default_values(), source="defaults"))
    default = _flat({k: v for k, v in defaults.as_dict().items() if isinstance(v, dict)})
    return {key: value for key, value in _flat({k: v for k, v in config.as_dict().items()
                                                if isinstance(v, dict)}).items()
            if default.get(key, object()) != value}


def describe_changes(config: TrainerConfig) -> str:
    """`key=value, ...` of changed_settings(), values as in YAML flow style."""
    def show(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("\n...")

    return ", ".join(f"{key}={show(value)}" for key, value in changed_settings(config).items())


