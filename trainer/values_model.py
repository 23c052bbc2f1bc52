"""The chart's values as typed Python: the one place a setting is defined.

Each field holds a key's type (its annotation), default, bounds or pattern (JSON
Schema keywords) and one-line doc. `python -m trainer.values_codegen` writes the
chart's `values.yaml` (each key under a comment that starts with its dotted name)
and `values.schema.json` (a description for every key) from these classes, and a
test fails when the committed files differ from what it writes. The trainer's
config types are the `training`, `checkpoint`, `s3` and `metrics` classes here.

Dataclasses rather than pydantic: the schema, not the classes, validates (Helm
validates with the same file), so the classes only need to carry metadata and
build frozen config objects, which the standard library does with no new
dependency on the CLI's start-up path.

A key's YAML name is its field name in camelCase. The doc follows the dotted
name: `epochs` with doc "is the number of passes ..." reads
`# training.epochs is the number of passes ...`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
OPTIONAL_DNS_SUBDOMAIN = "^$|" + DNS_SUBDOMAIN
QUANTITY = (r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
            r"|(\.[0-9]+))))?$")
STRING_MAP = {"type": "string"}

# Image references as container runtimes parse them (distribution's reference grammar): a registry host is
# told from a path by a dot, a port or `localhost`, and paths are lowercase; a tag or digest is not part of it.
_HOST_PART = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REPOSITORY = (f"^(?:(?:{_HOST_PART}(?:\\.{_HOST_PART})+(?::[0-9]+)?|{_HOST_PART}:[0-9]+|localhost)/)?"
                    f"{_PATH_PART}(?:/{_PATH_PART})*$")


def setting(default, doc: str, *, invalid: str = "", **schema):
    """A key: its default, doc and JSON Schema keywords (minimum=, enum=, pattern=, items=, ...).
    `invalid` is what a user is told when the value fails its pattern or alternatives."""
    metadata = {"doc": doc, "schema": schema, "invalid": invalid, "chart_only": False}
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str, *, chart_only: bool = False):
    """A nested mapping of keys. `chart_only` keeps it out of the trainer's config file."""
    return field(default_factory=cls, metadata={"doc": doc, "schema": {}, "invalid": "", "chart_only": chart_only})


def key_name(field) -> str:
    """A field's YAML key: its name in camelCase."""
    head, *rest = field.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def chart_only_keys() -> dict[str, tuple[str, ...]]:
    """Keys of the trainer's sections that only the chart reads: left out of the trainer's config file."""
    out = {}
    for section in dataclasses.fields(Values):
        cls = section.default_factory
        if dataclasses.is_dataclass(cls):
            only = tuple(key_name(f) for f in dataclasses.fields(cls) if f.metadata.get("chart_only"))
            if only:
                out[key_name(section)] = only
    return out


# ------------------------------------------------------------------ the job (chart only)
@dataclass(frozen=True)
class ImageValues:
    repository: str = setting("kubetrain/trainer", "is the trainer image without its tag.", minLength=1,
                              maxLength=255, pattern=IMAGE_REPOSITORY,
                              invalid="an image repository without a tag or digest: lowercase path components, "
                                      "after an optional registry host[:port]/ (e.g. ghcr.io/org/trainer); the tag "
                                      "goes in image.tag")
    tag: str = setting("", "defaults to the chart's appVersion when empty.", pattern="^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
                       invalid="an image tag: up to 128 letters, digits, '_', '.' and '-', not starting with '.' or "
                               "'-' (empty = the chart's appVersion)")
    pull_policy: str = setting("IfNotPresent", "is the container's imagePullPolicy.",
                               enum=["Always", "IfNotPresent", "Never"])
    pull_secrets: tuple[str, ...] = setting((), "lists the names of Secrets used to pull the image.",
                                            items={"type": "string", "pattern": DNS_SUBDOMAIN})


@dataclass(frozen=True)
class SchedulingPolicyValues:
    queue: str = setting("", "is the gang scheduler's queue (empty = its default).")
    priority_class: str = setting("", "is the PodGroup's PriorityClass (empty = none).", pattern=OPTIONAL_DNS_SUBDOMAIN)
    min_available: int = setting(0, "is how many pods must be schedulable together (0 = all of them).", minimum=0)


@dataclass(frozen=True)
class ElasticValues:
    enabled: bool = setting(False, "adds the PyTorchJob elasticPolicy (torchrun is then used even with one process "
                                   "per pod).")
    min_nodes: int = setting(1, "is the fewest pods training continues with.", minimum=1)
    max_nodes: int = setting(0, "is the most pods the job may grow to (0 = job.nodes).", minimum=0, maximum=1024)
    max_restarts: int = setting(3, "is how often torchrun restarts a pod's processes before the pod fails.", minimum=0)


@dataclass(frozen=True)
class JobValues:
    kind: str = setting("PyTorchJob", "is PyTorchJob (Kubeflow training operator v1) or TrainJob (Kubeflow Trainer "
                                      "v2, trainer.kubeflow.org).", enum=["PyTorchJob", "TrainJob"])
    runtime: str = setting("", "is the ClusterTrainingRuntime a TrainJob runs on (e.g. torch-distributed, which "
                               "Trainer v2 installs); that runtime then sets its pods' restart policy, backoff, "
                               "pull policy and scheduling. Empty = a TrainingRuntime the chart renders for the "
                               "experiment, which carries those settings as a PyTorchJob does.",
                           maxLength=253, pattern=OPTIONAL_DNS_SUBDOMAIN,
                           invalid="empty or a ClusterTrainingRuntime name (a DNS subdomain), for job.kind TrainJob")
    nodes: int = setting(2, "is the number of pods: 1 Master + (nodes-1) Workers.", minimum=1, maximum=1024)
    nproc_per_node: int = setting(1, "is the number of training processes per pod (torchrun when > 1).",
                                  minimum=1, maximum=64)
    restart_policy: str = setting("ExitCode", "is the replicas' restart policy; ExitCode retries exit codes >= 128 "
                                              "only (a TrainJob: not Always).",
                                  enum=["Always", "OnFailure", "Never", "ExitCode"])
    backoff_limit: int = setting(3, "is how many restarts the job gets before it is marked Failed.", minimum=0)
    master_port: int = setting(23456, "is the rendezvous port on the master (the operator's default is 23456); a "
                                      "TrainJob always uses Trainer v2's 29500.",
                               minimum=1, maximum=65535)
    ttl_seconds_after_finished: Optional[int] = setting(None, "deletes the finished job and its pods after this many "
                                                              "seconds (null = keep them).", minimum=0)
    active_deadline_seconds: Optional[int] = setting(None, "fails the job once it has been running this long (null = "
                                                           "no deadline).", minimum=1)
    clean_pod_policy: str = setting("None", "is which pods the operator deletes when the job finishes: None, Running "
                                            "or All (a TrainJob keeps them: None).", enum=["None", "Running", "All"])
    suspend: bool = setting(False, "creates the job without pods until it is resumed (Kueue sets and clears it "
                                   "itself).")
    scheduling_policy: SchedulingPolicyValues = section(
        SchedulingPolicyValues, "is read by gang schedulers (Volcano, scheduler-plugins) through the operator's "
                                "PodGroup.")
    elastic: ElasticValues = section(ElasticValues, "runs torchrun with c10d rendezvous so training goes on while pods "
                                                    "leave and join.")


# ------------------------------------------------------------------ training (the trainer's config)
@dataclass(frozen=True)
class TaskRule:
    """What one registered task can run: its data sources and its classifier head's default size."""
    num_classes: Optional[int]  # None: the task has no classifier head (causal-lm)
    sources: tuple[str, ...] = ()  # empty: any (custom)
    needs_path: tuple[str, ...] = ()  # sources read from training.data.path
    fixed_classes: tuple[tuple[str, int], ...] = ()  # (source, its number of classes)
    options: Optional[dict] = None  # JSON Schema of training.options, where the task types them
    language_model: bool = False  # takes finetune.method lora/qlora and activationCheckpointing


# causal-lm's training.options: typed here so that a mistake is refused before any replica starts.
CAUSAL_LM_OPTIONS = {
    "type": "object",
    "properties": {
        "maxSeqLength": {"type": ["integer", "null"], "minimum": 8, "description": "training.options.maxSeqLength "
                         "is the longest sequence in tokens (longer rows are truncated and counted in the log); "
                         "null = the model's max_position_embeddings"},
        "packing": {"type": "boolean", "description": "training.options.packing packs examples into full "
                    "maxSeqLength sequences, without attention or positions crossing example boundaries"},
        "trainOnPrompt": {"type": "boolean", "description": "training.options.trainOnPrompt also trains on "
                          "prompt/user tokens (default: loss on completion/assistant tokens only)"},
        "evalPrompts": {"type": "integer", "minimum": 0, "description": "training.options.evalPrompts is how many "
                        "held-out prompts rank 0 answers greedily at each evaluation (log and TensorBoard)"},
        "maxNewTokens": {"type": "integer", "minimum": 1, "description": "training.options.maxNewTokens bounds "
                         "those generations"},
    },
    "additionalProperties": {"not": {}, "description": "causal-lm takes the options maxSeqLength, packing, "
                             "trainOnPrompt, evalPrompts and maxNewTokens"},
    "if": {"required": ["packing"], "properties": {"packing": {"const": True}}},
    "then": {"required": ["maxSeqLength"], "properties": {"maxSeqLength": {"type": "integer", "description": (
        "training.options.packing needs training.options.maxSeqLength: the length of a packed sequence")}},
        "description": "training.options.packing needs training.options.maxSeqLength: the length of a packed "
                       "sequence"},
}


# The registered tasks (a test ties them to trainer.tasks' registry); the schema's per-task rules come from here.
TASK_RULES = {
    "bert-sentiment": TaskRule(2, ("synthetic", "file", "huggingface"), ("file", "huggingface"), (("synthetic", 2),)),
    "causal-lm": TaskRule(None, ("synthetic", "file"), ("file",), options=CAUSAL_LM_OPTIONS, language_model=True),
    "cifar10-convnet": TaskRule(10, ("synthetic", "cifar10"), (), (("cifar10", 10),)),
    "resnet18-finetune": TaskRule(10, ("synthetic", "cifar10", "imagefolder"), ("imagefolder",), (("cifar10", 10),)),
    "speech-conv1d": TaskRule(10, ("synthetic", "folder"), ("folder",)),
    "custom": TaskRule(10),
}


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = setting("adamw", "is adamw or sgd.", enum=["adamw", "sgd"])
    lr: float = setting(0.002, "is the peak learning rate.", exclusiveMinimum=0)
    weight_decay: float = setting(0.01, "is the decoupled (adamw) or L2 (sgd) weight decay.", minimum=0)
    momentum: float = setting(0.9, "is the SGD momentum (ignored by adamw).", minimum=0, maximum=1)


@dataclass(frozen=True)
class LrScheduleConfig:
    name: str = setting("cosine", "is cosine or constant.", enum=["cosine", "constant"])
    warmup_steps: int = setting(20, "is the number of linear warmup steps.", minimum=0)
    min_lr_ratio: float = setting(0.05, "is the final learning rate as a fraction of the peak.", minimum=0, maximum=1)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = setting(16, "is the rank r of the low-rank update.", minimum=1, maximum=4096)
    alpha: float = setting(32, "scales the update by alpha/rank.", exclusiveMinimum=0)
    dropout: float = setting(0.05, "is the dropout on the adapter's input.", minimum=0, maximum=1)
    target_modules: tuple[str, ...] = setting((), "names the layers that get adapters (module names or name suffixes, "
                                                  "e.g. q_proj); empty = every linear layer of attention and MLP.",
                                              items={"type": "string", "minLength": 1})


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = setting("full", "is full (every parameter trains) or lora (adapters through peft, causal-lm); qlora "
                                  "(a 4-bit base, CUDA only) is refused on CPU.", enum=["full", "lora", "qlora"])
    lora: LoraConfig = section(LoraConfig, "shapes the LoRA adapters (training.finetune.method lora).")
    freeze: tuple[str, ...] = setting((), "lists parameter-name prefixes that stay frozen (resnet18-finetune: empty "
                                          "means everything but `fc`).", items={"type": "string", "minLength": 1})
    unfreeze_after_epochs: Optional[int] = setting(None, "unfreezes the frozen parameters from this epoch on (null = "
                                                         "never; 0 = train them from the start).", minimum=0)
    backbone_lr_scale: float = setting(0.1, "multiplies the learning rate of the once-frozen (backbone) parameters "
                                            "after they unfreeze.", exclusiveMinimum=0)


@dataclass(frozen=True)
class DataConfig:
    source: str = setting("synthetic", "is `synthetic` (offline, learnable) or the task's real dataset (e.g. "
                                       "cifar10).", minLength=1)
    root: str = setting("/data", "is where a real dataset lives (or is downloaded to).")
    download: bool = setting(False, "lets torchvision download a real dataset into training.data.root.")
    train_samples: int = setting(8192, "is the size of the synthetic training set.", minimum=1)
    eval_samples: int = setting(2048, "is the size of the synthetic evaluation set.", minimum=1)
    num_workers: int = setting(0, "is the DataLoader worker count per process.", minimum=0)
    path: str = setting("", "is the task's data file or folder: CSV/JSONL with text,label (bert-sentiment), a WAV "
                            "folder with labels.csv (speech-conv1d), or a Hugging Face dataset name with source "
                            "huggingface.")
    eval_path: str = setting("", "is the evaluation file or folder (empty = hold out 10% of training.data.path).")
    pin_memory: bool = setting(True, "pins host batches for faster copies to the GPU (ignored on CPU).")
    persistent_workers: bool = setting(True, "keeps DataLoader workers alive between epochs (when numWorkers > 0).")
    prefetch_factor: int = setting(2, "is the number of batches each worker loads ahead (when numWorkers > 0).",
                                   minimum=1)
    on_device: bool = setting(False, "copies a small tensor dataset to the GPU once and batches it there (no "
                                     "DataLoader workers, no host copies).")


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = setting("auto", "is auto (nccl on GPU, gloo on CPU), gloo or nccl.", enum=["auto", "gloo", "nccl"])
    timeout_seconds: int = setting(600, "bounds every collective before the job fails.", minimum=1)
    hang_timeout_seconds: int = setting(1800, "is how long no step, evaluation or checkpoint may go without finishing "
                                              "before it counts as a hang: exit 142 (retryable); 0 disables.",
                                        minimum=0)


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = setting(True, "writes train loss, learning rate, gradient norm, samples/s, per-rank step time, "
                                  "eval loss and accuracy and the run's config.")
    sync_seconds: int = setting(30, "copies new events to an s3:// checkpoint.uri at most this often while training "
                                    "(and always at the end).", minimum=1)


@dataclass(frozen=True)
class TrainingConfig:
    task: str = setting("cifar10-convnet", "is a registered workload name, or `custom` with training.entrypoint.",
                        enum=sorted(TASK_RULES))
    entrypoint: str = setting("", 'is "package.module:function" returning a task spec when task is `custom`.',
                              pattern="^$|^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
                              invalid="package.module:function for task custom.")
    epochs: int = setting(3, "is the number of passes over the training set.", minimum=1)
    max_steps: int = setting(0, "stops training after this many optimizer steps (0 = no limit); whichever of "
                                "epochs/maxSteps comes first wins.", minimum=0)
    batch_size: int = setting(64, "is the per-process micro-batch size.", minimum=1)
    grad_accum_steps: int = setting(1, "is the number of micro-batches per optimizer step.", minimum=1)
    grad_clip_norm: float = setting(1.0, "clips the global gradient norm (0 = off).", minimum=0)
    precision: str = setting("fp32", "is the autocast precision: fp32, bf16 or fp16 (fp16 uses a GradScaler).",
                             enum=["fp32", "bf16", "fp16"])
    parallelism: str = setting("ddp", "is ddp (replicated model) or fsdp (sharded model).", enum=["ddp", "fsdp"])
    activation_checkpointing: bool = setting(False, "recomputes each decoder layer's activations in the backward pass "
                                                    "(less memory, about a third more compute; causal-lm).")
    seed: int = setting(1234, "seeds model init (same on every rank) and data order; each rank adds its rank for its "
                              "own randomness.", minimum=0)
    # None after loading only for a custom task that leaves it unset
    num_classes: Optional[int] = setting(None, "is the size of the classifier head (null = the task's own: 2 for "
                                               "bert-sentiment, 10 for the others).", minimum=2)
    pretrained: Union[bool, str] = setting(False, "is true/false, or a weights URI (file://, s3://) for offline "
                                                  "clusters; causal-lm: a save_pretrained folder (file://, s3://, or "
                                                  "hf://org/name[@revision]).",
                                           oneOf=[{"type": "boolean"},
                                                  {"type": "string", "pattern": "^((file|s3)://.+|hf://[^/@]+/[^/@]+(@.+)?)$"}],
                                           invalid="true/false, a weights URI (file://, s3://), or hf://org/name.")
    log_every_steps: int = setting(20, "prints a progress line every N optimizer steps.", minimum=1)
    eval_every_epochs: int = setting(1, "runs evaluation every N epochs (and always at the end).", minimum=1)
    optimizer: OptimizerConfig = section(OptimizerConfig, "chooses the optimizer and its hyper-parameters.")
    lr_schedule: LrScheduleConfig = section(LrScheduleConfig, "is a linear warmup followed by cosine decay or a "
                                                              "constant rate.")
    finetune: FinetuneConfig = section(FinetuneConfig, "controls which parameters train.")
    data: DataConfig = section(DataConfig, "selects and shapes the dataset.")
    distributed: DistributedConfig = section(DistributedConfig, "configures the process group.")
    options: dict = setting({}, "holds task-specific settings (see each task's docs; causal-lm: maxSeqLength, packing, "
                                "trainOnPrompt, evalPrompts, maxNewTokens).")
    python_path: tuple[str, ...] = setting((), "lists directories prepended to the import path, e.g. a mounted volume "
                                               "holding the package of training.entrypoint.",
                                           items={"type": "string", "minLength": 1})
    step_log_file: str = setting("", "is a JSON-lines file (relative to the working directory) where rank 0 appends "
                                     "step, loss and lr after every optimizer step; empty = off.")
    tensorboard: TensorBoardConfig = section(TensorBoardConfig, "makes rank 0 write TensorBoard event files: under "
                                                                "the local run's workdir, else "
                                                                "<checkpoint.uri>/<experiment>/tensorboard/ (none "
                                                                "without either).")
    export_model: bool = setting(True, "makes rank 0 write the final model for inference (model.safetensors + "
                                       "model.json) at the end of a successful run, next to the TensorBoard events.")


@dataclass(frozen=True)
class CheckpointConfig:
    uri: str = setting("", "is file:///path or s3://bucket/prefix; empty disables checkpoints.",
                       pattern="^$|^file://.+|^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                       invalid="file:///path or s3://bucket/prefix (a bucket name of 3-63 lowercase letters, digits, "
                               "dots and dashes); empty disables checkpoints.")
    every_steps: int = setting(0, "saves every N optimizer steps (0 = only at the end).", minimum=0)
    keep_last: int = setting(3, "keeps this many committed steps.", minimum=1)
    resume: Union[str, int] = setting("auto", "is auto (newest committed step), never, or a step number.",
                                      oneOf=[{"type": "string", "enum": ["auto", "never"]},
                                             {"type": "integer", "minimum": 0}],
                                      invalid="auto, never, or a step number.")
    force: bool = setting(False, "loads a checkpoint even when it was made with a different config hash (task, data, "
                                 "seed, options).")
    async_save: bool = setting(False, "uploads checkpoints in the background while training continues (at most one "
                                      "save in flight).")


@dataclass(frozen=True)
class DevSecretValues:
    enabled: bool = setting(False, "creates and uses the Secret (only when s3.credentialsSecret is empty).")
    access_key_id: str = setting("", "becomes AWS_ACCESS_KEY_ID.")
    secret_access_key: str = setting("", "becomes AWS_SECRET_ACCESS_KEY.")


@dataclass(frozen=True)
class S3Config:
    endpoint: str = setting("", "is the endpoint URL of an S3-compatible server (empty = AWS).",
                            pattern="^$|^https?://.+")
    region: str = setting("us-east-1", "is the signing region.")
    addressing_style: str = setting("path", "is path, virtual or auto.", enum=["path", "virtual", "auto"])
    credentials_secret: str = setting("", "names the Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
                                      pattern=OPTIONAL_DNS_SUBDOMAIN, maxLength=253)
    retry_seconds: int = setting(60, "is how long each storage operation retries 5xx answers (InternalError, "
                                     "SlowDown), throttling and connection errors, with exponential backoff, "
                                     "before the replica exits 144 for a restart.", minimum=0, maximum=3600)
    # Credentials: never in the trainer's config file (its ConfigMap), only in the Secret made from them.
    dev_secret: DevSecretValues = section(DevSecretValues, "makes a Secret `<experiment>-s3-dev` from these values, for "
                                                           "development clusters only: the keys end up in the "
                                                           "release.", chart_only=True)


@dataclass(frozen=True)
class PodMonitorValues:
    enabled: bool = setting(False, "renders the PodMonitor.")
    labels: dict = setting({}, "are added to the PodMonitor, e.g. what your Prometheus' podMonitorSelector matches.",
                           additionalProperties=STRING_MAP)
    interval: str = setting("15s", "is the scrape interval.", pattern="^([0-9]+(ms|s|m|h|d|w|y))+$",
                            invalid="A Prometheus duration, e.g. 15s.")


@dataclass(frozen=True)
class PrometheusRuleValues:
    enabled: bool = setting(False, "renders the PrometheusRule.")
    labels: dict = setting({}, "are added to the PrometheusRule, e.g. what your Prometheus' ruleSelector matches.",
                           additionalProperties=STRING_MAP)
    goodput_below: float = setting(0.5, "is the goodput (the share of the experiment's wall time since its first "
                                   "start, across restarts, spent in training steps that were kept) under which "
                                   "the KubetrainLowGoodput alert fires after 30 minutes; 0 turns it off.",
                                   minimum=0, maximum=1)


@dataclass(frozen=True)
class DashboardValues:
    enabled: bool = setting(True, "renders the dashboard ConfigMap.")
    labels: dict = setting({}, "are added to the dashboard ConfigMap.", additionalProperties=STRING_MAP)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = setting(True, "serves /metrics on every rank.")
    port: int = setting(9400, "is the /metrics port of local rank 0; local rank N listens on port+N.",
                        minimum=1, maximum=65535)
    peak_flops: Optional[float] = setting(None, "is the accelerator's peak FLOP/s per rank that MFU is measured "
                                                "against (null = the dense peak of a known GPU at "
                                                "training.precision; MFU is not reported where none is known, "
                                                "e.g. on CPU).", exclusiveMinimum=0)
    pod_monitor: PodMonitorValues = section(PodMonitorValues, "makes the Prometheus operator scrape every rank (needs "
                                                              "the monitoring.coreos.com CRDs).", chart_only=True)
    prometheus_rule: PrometheusRuleValues = section(PrometheusRuleValues, "ships the alert rules (needs the "
                                                                          "monitoring.coreos.com CRDs).",
                                                    chart_only=True)
    dashboard: DashboardValues = section(DashboardValues, 'ships the Grafana dashboard as a ConfigMap labelled '
                                                          'grafana_dashboard: "1" for Grafana\'s sidecar.',
                                         chart_only=True)


# ------------------------------------------------------------------ the pods (chart only)
@dataclass(frozen=True)
class ResourcesValues:
    gpu: int = setting(0, "is the number of nvidia.com/gpu per pod (requests = limits).", minimum=0)
    cpu: Union[str, float] = setting("2", "is the CPU request (and limit) per pod.", pattern=QUANTITY, minimum=0,
                                     invalid='a non-negative Kubernetes quantity of CPU, e.g. 2, "500m" or 0.5')
    memory: Union[str, int] = setting("4Gi", "is the memory request (and limit) per pod.", pattern=QUANTITY, minimum=0,
                                      invalid='a non-negative Kubernetes quantity of memory, e.g. "4Gi" or "512Mi"')


@dataclass(frozen=True)
class ShmValues:
    size_limit: str = setting("1Gi", "bounds /dev/shm; it counts against resources.memory.",
                              pattern=r"^$|^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
                              invalid="A memory quantity; empty = bounded only by the pod's memory limit.")


@dataclass(frozen=True)
class ServiceAccountValues:
    create: bool = setting(True, "makes a ServiceAccount named after the experiment.")
    name: str = setting("", "is an existing ServiceAccount to use when serviceAccount.create is false (empty = "
                            "default).", pattern=OPTIONAL_DNS_SUBDOMAIN)
    annotations: dict = setting({}, "go on the created ServiceAccount (e.g. IAM roles for S3 access).",
                                additionalProperties=STRING_MAP)


RBAC_SUBJECT = {
    "type": "object", "required": ["kind", "name"],
    "properties": {"kind": {"type": "string", "enum": ["User", "Group", "ServiceAccount"]},
                   "name": {"type": "string", "minLength": 1}, "apiGroup": {"type": "string"},
                   "namespace": {"type": "string"}},
    "additionalProperties": False,
}


@dataclass(frozen=True)
class RbacValues:
    create: bool = setting(False, "renders the Role `<name>-kubetrain-user`.")
    subjects: tuple[dict, ...] = setting((), "are bound to that Role by a RoleBinding (RBAC subjects: kind, name, "
                                             "apiGroup/namespace).", items=RBAC_SUBJECT)


# Kubernetes objects with more fields than the chart sets: the keys below are typed, others pass through.
@dataclass(frozen=True)
class SeccompProfileValues:
    open_object: ClassVar[bool] = True
    type: str = setting("RuntimeDefault", "is RuntimeDefault.")


@dataclass(frozen=True)
class PodSecurityContextValues:
    open_object: ClassVar[bool] = True
    run_as_non_root: bool = setting(True, "refuses to start a container whose user is root.")
    run_as_user: int = setting(1000, "is the processes' user id.")
    run_as_group: int = setting(1000, "is the processes' primary group id.")
    fs_group: int = setting(1000, "owns the mounted volumes, so the trainer can write to them.")
    seccomp_profile: SeccompProfileValues = section(SeccompProfileValues, "is the container runtime's default seccomp "
                                                                          "filter.")


@dataclass(frozen=True)
class CapabilitiesValues:
    open_object: ClassVar[bool] = True
    drop: tuple[str, ...] = setting(("ALL",), "lists the dropped capabilities.", items={"type": "string"})


@dataclass(frozen=True)
class SecurityContextValues:
    open_object: ClassVar[bool] = True
    allow_privilege_escalation: bool = setting(False, "forbids setuid binaries from gaining privileges.")
    read_only_root_filesystem: bool = setting(True, "mounts the image read-only (/tmp and /dev/shm are emptyDirs).")
    capabilities: CapabilitiesValues = section(CapabilitiesValues, "drops every Linux capability.")


@dataclass(frozen=True)
class KueueValues:
    queue_name: str = setting("", "is the LocalQueue; it sets the kueue.x-k8s.io/queue-name label (empty = no Kueue).",
                              pattern=OPTIONAL_DNS_SUBDOMAIN)


# ---- Kubernetes' own types (tools/k8s_pod_types.json, vendored from the API server's OpenAPI document by
# tools/k8s_openapi.py; values_codegen puts them under the schema's definitions), plus the rules of its
# validation that OpenAPI cannot say. `exactlyOneOf` names a definition whose properties (but `name`)
# are alternatives: values_codegen writes the oneOf from the vendored file.
def k8s(kind: str) -> dict:
    return {"$ref": f"#/definitions/io.k8s.api.core.v1.{kind}"}


DNS_LABEL = {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
             "errorMessage": "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending "
                             "with a letter or digit"}
# A label or annotation key: an optional DNS subdomain prefix (253) and '/', then a name of at most 63.
QUALIFIED_NAME = {"type": "string", "allOf": [
    {"pattern": "^([^/]{1,253}/)?[^/]{1,63}$",
     "errorMessage": "a key is [prefix/]name: a prefix of at most 253 characters and a name of at most 63"},
    {"pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
     "errorMessage": "a key is [prefix/]name: the name of letters, digits, '-', '_' and '.', starting and ending "
                     "with a letter or digit; the prefix a lowercase DNS subdomain"}]}
LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
               "errorMessage": "a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending "
                               "with a letter or digit (or empty)"}
LABELS = {"additionalProperties": LABEL_VALUE, "propertyNames": QUALIFIED_NAME}


def _then(rule: dict, why: str) -> dict:
    """A rule inside an if/then: its description is the message (trainer/values.py shows it)."""
    return {**rule, "description": why, "errorMessage": why}


TOLERATION = {"allOf": [k8s("Toleration"), {"properties": {
    "key": {"anyOf": [{"const": ""}, QUALIFIED_NAME]},
    "value": {**LABEL_VALUE}}}], "if": {"properties": {"operator": {"const": "Exists"}}, "required": ["operator"]},
    "then": {"properties": {"value": _then({"const": ""}, "a toleration with operator Exists matches any value: "
                                                        "leave value out")}},
    "else": {"if": {"properties": {"key": {"const": ""}}},
             "then": {"required": ["operator"], "properties": {"operator": _then(
                 {"const": "Exists"}, "a toleration without a key must have operator Exists")},
                 "description": "a toleration without a key must have operator Exists"}},
}
TOLERATION_SECONDS = {"if": {"required": ["tolerationSeconds"]}, "then": {
    "required": ["effect"], "description": "tolerationSeconds is for effect NoExecute only",
    "properties": {"effect": _then({"const": "NoExecute"}, "tolerationSeconds is for effect NoExecute only")}}}
ENV_VAR = {"allOf": [k8s("EnvVar"), {
    "properties": {"name": {"pattern": "^[-._a-zA-Z][-._a-zA-Z0-9]*$",
                            "errorMessage": "an environment variable name: letters, digits, '_', '-' and '.', "
                                            "not starting with a digit"},
                   "valueFrom": {"exactlyOneOf": "EnvVarSource",
                                 "errorMessage": "valueFrom takes exactly one source (fieldRef, resourceFieldRef, "
                                                 "configMapKeyRef, secretKeyRef or fileKeyRef)"}},
    "not": {"required": ["value", "valueFrom"], "properties": {"value": {"minLength": 1}}},
    "errorMessage": "an env entry takes value or valueFrom, not both"}]}
VOLUME = {"allOf": [k8s("Volume"), {
    "properties": {"name": DNS_LABEL},
    "exactlyOneOf": "Volume",
    "errorMessage": "a volume takes exactly one source (e.g. persistentVolumeClaim, configMap, secret, emptyDir): "
                    "none would be an emptyDir, two are refused by Kubernetes"}]}
VOLUME_MOUNT = {"allOf": [k8s("VolumeMount"), {"properties": {"name": DNS_LABEL}}]}


@dataclass(frozen=True)
class Values:
    """The whole of values.yaml, in its order."""
    image: ImageValues = section(ImageValues, "is the trainer image the pods run.")
    job: JobValues = section(JobValues, "describes the training job: its kind, replicas, processes and restart "
                                        "semantics.")
    training: TrainingConfig = section(TrainingConfig, "configures the trainer inside every process.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "configures saving and resuming.")
    s3: S3Config = section(S3Config, "configures S3-compatible object storage for checkpoints and weights.")
    metrics: MetricsConfig = section(MetricsConfig, "configures the per-rank Prometheus endpoint.")
    resources: ResourcesValues = section(ResourcesValues, "are per pod.")
    shm: ShmValues = section(ShmValues, "is the pod's /dev/shm: a memory-backed emptyDir, as DataLoader workers and "
                                        "NCCL need more than the runtime's 64Mi.")
    env: tuple[dict, ...] = setting((), "lists extra container environment variables (Kubernetes EnvVar objects: name "
                                        "plus value or valueFrom).", items=ENV_VAR)
    nccl_env: dict = setting({}, 'passes NCCL_* settings to every process, e.g. {NCCL_DEBUG: INFO, NCCL_IB_DISABLE: '
                                 '"1"}.', additionalProperties=False,
                             patternProperties={"^NCCL_[A-Z0-9_]+$": {"type": ["string", "integer", "boolean"]}})
    volumes: tuple[dict, ...] = setting((), "are extra pod volumes, e.g. a PersistentVolumeClaim holding "
                                            "training.data.root.", items=VOLUME)
    volume_mounts: tuple[dict, ...] = setting((), "are extra trainer container mounts of the volumes above.",
                                              items=VOLUME_MOUNT)
    service_account: ServiceAccountValues = section(ServiceAccountValues, "is the pods' identity; its API token is "
                                                                          "never mounted.")
    rbac: RbacValues = section(RbacValues, "ships a Role for people (or CI bots) who run `kubetrain "
                                           "submit/status/logs/list/delete` against this namespace: what those verbs "
                                           "need, and no access to Secrets.")
    pod_annotations: dict = setting({}, "are added to every trainer pod.", additionalProperties=STRING_MAP,
                                    propertyNames=QUALIFIED_NAME)
    pod_labels: dict = setting({}, "are added to every trainer pod.", **LABELS)
    pod_security_context: PodSecurityContextValues = section(PodSecurityContextValues, "is the pods' security context.")
    security_context: SecurityContextValues = section(SecurityContextValues, "is the trainer container's security "
                                                                             "context; /tmp stays writable on the "
                                                                             "read-only root filesystem.")
    termination_grace_period_seconds: int = setting(300, "is how long a pod has after SIGTERM to commit a checkpoint "
                                                         "and exit 143.", minimum=0)
    node_selector: dict = setting({}, "constrains the pods to nodes with these labels.", **LABELS)
    tolerations: tuple[dict, ...] = setting((), "let the pods onto tainted (e.g. GPU) nodes.",
                                            items={"allOf": [TOLERATION, TOLERATION_SECONDS]})
    affinity: dict = setting({}, "is the pods' node/pod affinity.", allOf=[k8s("Affinity")])
    priority_class_name: str = setting("", "is the pods' PriorityClass (empty = the cluster default).",
                                       pattern=OPTIONAL_DNS_SUBDOMAIN)
    scheduler_name: str = setting("", "is the pods' scheduler (empty = default-scheduler), e.g. volcano for gang "
                                      "scheduling.")
    kueue: KueueValues = section(KueueValues, "submits the job through Kueue.")
