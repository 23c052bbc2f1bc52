"""What `kubetrain run` (no helm) shares with the pods the chart renders: the chart's refusals
(files/messages.yaml, as `kubetrain.validate` reads it), the container's command and plain env.
render and submit check here too, so a bad value is one message naming its key before helm runs.
tests/test_chart_tie.py holds all of it to what helm renders.
"""

from __future__ import annotations

import json

from trainer.chart import chart_message, default_values
from trainer.config import check_experiment_name
from trainer.errors import UserError

CONFIG_DIR = "/etc/kubetrain"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
MAX_NAME = 63  # DNS-1035 label: the operator names pods and Services `<job>-worker-<i>`
MAX_RELEASE_NAME = 53  # Helm refuses longer release names
TRAINJOB_RENDEZVOUS_PORT = 29500  # Trainer v2's torch plugin sets PET_MASTER_PORT to it, whatever job.masterPort says
# The pod's own volumes and where the trainer container mounts them (`kubetrain.chartVolumes` and
# `kubetrain.chartVolumeMounts`; tests/test_pod_values.py holds these to what helm renders).
CHART_MOUNTS = {"config": CONFIG_DIR, "dshm": "/dev/shm", "tmp": "/tmp"}


def max_nodes(job: dict) -> int:
    """`kubetrain.maxNodes`: the most pods the job can have."""
    elastic = job["elastic"]
    if elastic["enabled"] and int(elastic["maxNodes"]) > 0:
        return int(elastic["maxNodes"])
    return int(job["nodes"])


def check_values(name: str, values: dict) -> None:
    """`kubetrain.validate`: what the schema cannot say, with the chart's messages, in its order."""
    if len(name) > MAX_RELEASE_NAME:
        raise UserError(f"experiment name {json.dumps(name)} is longer than {MAX_RELEASE_NAME} characters, "
                        "Helm's limit for a release name")
    check_experiment_name(name)
    try:
        _check_sections(name, values)
    except KeyError as e:  # a section removed with `--set key=null`: helm fails on it too
        raise UserError(f"values: the key {e.args[0]!r} is missing (was it set to null?)") from None


def _check_sections(name: str, values: dict) -> None:
    job = values["job"]
    last_worker = f"{name}-worker-{max(0, max_nodes(job) - 2)}"
    if len(last_worker) > MAX_NAME:
        raise UserError(chart_message("podNameTooLong", name, last_worker))
    nodes, elastic = int(job["nodes"]), job["elastic"]
    if elastic["enabled"]:
        if int(elastic["minNodes"]) > nodes:
            raise UserError(chart_message("elasticMinNodes", elastic["minNodes"], nodes))
        if max_nodes(job) < nodes:
            raise UserError(chart_message("elasticMaxNodes", elastic["maxNodes"], nodes))
    if values["metrics"]["enabled"]:
        first, nproc = int(values["metrics"]["port"]), int(job["nprocPerNode"])
        last = first + nproc - 1
        if last > 65535:
            raise UserError(chart_message("metricsPortRange", first, nproc))
        if job["kind"] != "TrainJob" and first <= int(job["masterPort"]) <= last:
            raise UserError(chart_message("masterPortCollides", job["masterPort"], first, last))
        if job["kind"] == "TrainJob" and first <= TRAINJOB_RENDEZVOUS_PORT <= last:
            raise UserError(chart_message("trainJobPortCollides", first, last, TRAINJOB_RENDEZVOUS_PORT))
    if job["kind"] == "TrainJob":
        check_train_job(values)
    s3 = values["s3"]
    if s3["devSecret"]["enabled"] and s3["credentialsSecret"]:
        raise UserError(chart_message("devSecretExclusive"))
    if s3["devSecret"]["enabled"] and not (s3["devSecret"]["accessKeyId"] and s3["devSecret"]["secretAccessKey"]):
        raise UserError(chart_message("devSecretKeys"))
    check_pod(values)


def chart_env_names(values: dict) -> list[str]:
    """`kubetrain.chartEnv`'s names: HOME, the S3 credentials when a Secret holds them, ncclEnv."""
    s3 = values["s3"]
    secret = s3["credentialsSecret"] or s3["devSecret"]["enabled"]
    return ["HOME", *(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] if secret else []),
            *sorted(values.get("ncclEnv") or {})]


def check_pod(values: dict) -> None:
    """`kubetrain.validatePod`: the user's volumes, mounts and env against the pod's own, mounts against
    volumes; what spans keys, which the schema cannot hold. Kubernetes would refuse every pod (or, for
    env, silently let the user's entry replace the chart's)."""
    own = list(CHART_MOUNTS)
    volumes = list(own)
    for i, volume in enumerate(values.get("volumes") or []):
        if volume["name"] in own:
            raise UserError(chart_message("volumeReserved", i, volume["name"], ", ".join(own)))
        if volume["name"] in volumes:
            raise UserError(chart_message("volumeTwice", i, volume["name"]))
        volumes.append(volume["name"])
    paths = {path: name for name, path in CHART_MOUNTS.items()}
    user_paths: list[str] = []
    for i, mount in enumerate(values.get("volumeMounts") or []):
        if mount["name"] not in volumes:
            raise UserError(chart_message("mountNoVolume", i, mount["name"], ", ".join(own)))
        path = mount["mountPath"].removesuffix("/") or "/"
        if path in paths:
            raise UserError(chart_message("mountPathReserved", i, mount["mountPath"], paths[path]))
        if path in user_paths:
            raise UserError(chart_message("mountPathTwice", i, mount["mountPath"]))
        user_paths.append(path)
    chart_env = chart_env_names(values)
    for i, var in enumerate(values.get("env") or []):
        if var["name"] in chart_env:
            raise UserError(chart_message("envReserved", i, var["name"], ", ".join(chart_env)))


def check_train_job(values: dict) -> None:
    """What only a PyTorchJob can do, refused for a TrainJob (`kubetrain.validate`); with a named
    ClusterTrainingRuntime, also what that runtime sets and a patch cannot: those keys stay at their defaults."""
    job, scheduling, defaults = values["job"], values["job"]["schedulingPolicy"], default_values()
    if job["elastic"]["enabled"]:
        raise UserError(chart_message("trainJobElastic"))
    if job["restartPolicy"] == "Always":
        raise UserError(chart_message("trainJobRestartAlways"))
    if job["cleanPodPolicy"] != "None":
        raise UserError(chart_message("trainJobCleanPodPolicy"))
    if int(job["masterPort"]) != int(defaults["job"]["masterPort"]):
        raise UserError(chart_message("trainJobMasterPort", TRAINJOB_RENDEZVOUS_PORT, defaults["job"]["masterPort"]))
    runtime = job.get("runtime")
    if runtime:
        owned = [("image.pullPolicy", values["image"]["pullPolicy"], defaults["image"]["pullPolicy"]),
                 ("job.restartPolicy", job["restartPolicy"], defaults["job"]["restartPolicy"]),
                 ("job.backoffLimit", int(job["backoffLimit"]), int(defaults["job"]["backoffLimit"]))]
        for key, value, default in owned:
            if value != default:
                raise UserError(chart_message("trainJobRuntimeOwns", key, runtime, default))
    if scheduling["queue"] or scheduling["priorityClass"] or int(scheduling["minAvailable"]) > 0:
        raise UserError(chart_message("trainJobGangScheduling"))
    if job.get("ttlSecondsAfterFinished") is not None:
        raise UserError(chart_message("trainJobTtl"))
    if runtime and (values.get("priorityClassName") or values.get("schedulerName")):
        raise UserError(chart_message("trainJobPodScheduling", runtime))
    for entry in values.get("env") or []:
        if str(entry.get("name", "")).startswith("PET_"):
            raise UserError(chart_message("trainJobReservedEnv", entry["name"]))


def trainer_command(values: dict, config_path: str = CONFIG_PATH, python: str = "python") -> list[str]:
    """`kubetrain.command`, for the pods and `kubetrain run`'s processes alike: torchrun reads PET_* (set by
    the operator) for nodes, rank and rendezvous; trainer.worker.launch is torchrun that keeps the workers'
    exit codes for restartPolicy ExitCode, and the launcher a TrainJob needs (Trainer v2 sets only PET_*)."""
    job = values["job"]
    torchrun = ["-m", "trainer.worker.launch"] if (int(job["nprocPerNode"]) > 1 or job["elastic"]["enabled"]
                                                   or job["kind"] == "TrainJob") else []
    return [python, *torchrun, "-m", "trainer", "--config", config_path]


def container_env(values: dict) -> dict[str, str]:
    """The plain `value:` entries of the container's env (`kubetrain.env`): ncclEnv, then the user's env.
    HOME=/tmp (a pod's read-only root) and secretKeyRef credentials stay the pod's."""
    env = {key: value if isinstance(value, str) else json.dumps(value)
           for key, value in sorted((values.get("ncclEnv") or {}).items())}
    for entry in values.get("env") or []:
        if isinstance(entry, dict) and "value" in entry:
            env[str(entry["name"])] = str(entry["value"])
    return env
