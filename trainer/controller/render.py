"""`kubetrain render`: the chart's manifests from the chart's values, without helm.

Every function below mirrors one template of helm/kubetrain/templates (named in
its docstring) line by line, and prints what it prints: `helm template NAME
helm/kubetrain -f v.yaml` and `kubetrain render NAME -f v.yaml` give the same
bytes, which tests/test_chart_parity.py checks with the real helm binary. Change
both sides together. The Go functions the templates call (quote, toYaml, toJson,
toPrettyJson, nindent) are in helm_functions.py, with Go's output.

Helm reads numbers from values files as float64, so the templates never print
a number with `%v` (1000000 would become 1e+06): integers go through `int`,
free-form scalars through toJson. `go_string` is the Python side of that.
"""

from __future__ import annotations

import functools
import hashlib
import json

import yaml

from trainer.chart import SafeLoader, chart_dir, chart_message, chart_text
from trainer.config import check_experiment_name, trainer_config_document
from trainer.controller.helm_functions import nindent, quote, to_json, to_pretty_json, to_yaml
from trainer.errors import UserError
from trainer.values import HelmValuesLoader

CONFIG_DIR = "/etc/kubetrain"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
MAX_NAME = 63  # DNS-1035 label: the operator names pods and Services `<job>-worker-<i>`
MAX_RELEASE_NAME = 53  # Helm refuses longer release names


@functools.cache
def chart_metadata() -> dict:
    with open(chart_dir() / "Chart.yaml", encoding="utf-8") as f:
        return yaml.load(f, Loader=SafeLoader)


def chart_file(relative: str, experiment: str) -> str:
    """A file shipped in the chart with __EXPERIMENT__ and __DASHBOARD_UID__ filled in (`.Files.Get | replace`)."""
    text = chart_text(relative)
    return text.replace("__EXPERIMENT__", experiment).replace("__DASHBOARD_UID__", dashboard_uid(experiment))


def dashboard_uid(experiment: str) -> str:
    """The `kubetrain.dashboardUid` helper: one Grafana uid per release, within Grafana's 40 characters."""
    return "kubetrain-" + hashlib.sha256(experiment.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- scalars
def go_string(value) -> str:
    """The `kubetrain.string` helper: strings as they are, other scalars as Go's toJson prints them."""
    return value if isinstance(value, str) else to_json(value)


# ---------------------------------------------------------------- names and checks
def max_nodes(job: dict) -> int:
    """`kubetrain.maxNodes`: the most pods the job can have."""
    elastic = job["elastic"]
    if elastic["enabled"] and int(elastic["maxNodes"]) > 0:
        return int(elastic["maxNodes"])
    return int(job["nodes"])


def s3_secret_name(name: str, values: dict) -> str:
    s3 = values["s3"]
    if s3["credentialsSecret"]:
        return s3["credentialsSecret"]
    return f"{name}-s3-dev" if s3["devSecret"]["enabled"] else ""


def service_account_name(name: str, values: dict) -> str:
    account = values["serviceAccount"]
    return name if account["create"] else (account["name"] or "default")


def check_values(name: str, values: dict) -> None:
    """`kubetrain.validate`: what the schema cannot say, with the chart's messages, in its order.
    `kubetrain run` checks the same, so a job that runs locally can also be submitted."""
    if len(name) > MAX_RELEASE_NAME:
        raise UserError(f"experiment name {json.dumps(name)} is longer than {MAX_RELEASE_NAME} characters, "
                        "Helm's limit for a release name")
    check_experiment_name(name)
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
        if first <= int(job["masterPort"]) <= last:
            raise UserError(chart_message("masterPortCollides", job["masterPort"], first, last))
    if job["kind"] == "TrainJob":
        check_train_job(values)
    s3 = values["s3"]
    if s3["devSecret"]["enabled"] and s3["credentialsSecret"]:
        raise UserError(chart_message("devSecretExclusive"))
    if s3["devSecret"]["enabled"] and not (s3["devSecret"]["accessKeyId"] and s3["devSecret"]["secretAccessKey"]):
        raise UserError(chart_message("devSecretKeys"))


def check_train_job(values: dict) -> None:
    """What only a PyTorchJob can do, refused for a TrainJob (`kubetrain.validate`)."""
    job, scheduling = values["job"], values["job"]["schedulingPolicy"]
    if job["elastic"]["enabled"]:
        raise UserError(chart_message("trainJobElastic"))
    if scheduling["queue"] or scheduling["priorityClass"] or int(scheduling["minAvailable"]) > 0:
        raise UserError(chart_message("trainJobGangScheduling"))
    if job.get("ttlSecondsAfterFinished") is not None:
        raise UserError(chart_message("trainJobTtl"))
    if values.get("priorityClassName") or values.get("schedulerName"):
        raise UserError(chart_message("trainJobPodScheduling"))
    for entry in values.get("env") or []:
        if str(entry.get("name", "")).startswith("PET_"):
            raise UserError(chart_message("trainJobReservedEnv", entry["name"]))


# ---------------------------------------------------------------- labels
def selector_labels(name: str) -> dict:
    return {"app.kubernetes.io/name": chart_metadata()["name"], "app.kubernetes.io/instance": name}


def common_labels(name: str) -> dict:
    """`kubetrain.labels` as `fromYaml` reads it."""
    meta = chart_metadata()
    return {
        "helm.sh/chart": chart_label(),
        **selector_labels(name),
        "app.kubernetes.io/version": str(meta["appVersion"]),
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/part-of": "kubetrain",
        "kubetrain.io/experiment": name,
    }


def trainer_selector_labels(name: str) -> dict:
    return {**selector_labels(name), "app.kubernetes.io/component": "trainer"}


def chart_label() -> str:
    """`kubetrain.chart`."""
    meta = chart_metadata()
    return f"{meta['name']}-{meta['version']}".replace("+", "_")[:63].removesuffix("-")


def selector_labels_text(name: str) -> str:
    return f"app.kubernetes.io/name: {chart_metadata()['name']}\napp.kubernetes.io/instance: {quote(name)}"


def labels_text(name: str) -> str:
    """`include "kubetrain.labels"`: the text the templates print."""
    return "\n".join([
        f"helm.sh/chart: {chart_label()}",
        selector_labels_text(name),
        f"app.kubernetes.io/version: {quote(str(chart_metadata()['appVersion']))}",
        "app.kubernetes.io/managed-by: Helm",
        "app.kubernetes.io/part-of: kubetrain",
        f"kubetrain.io/experiment: {quote(name)}",
    ])


def trainer_selector_labels_text(name: str) -> str:
    return selector_labels_text(name) + "\napp.kubernetes.io/component: trainer"


def image(values: dict) -> str:
    return f"{values['image']['repository']}:{values['image']['tag'] or chart_metadata()['appVersion']}"


def metrics_port_names(values: dict) -> list[tuple[str, int]]:
    first = int(values["metrics"]["port"])
    return [("metrics" if rank == 0 else f"metrics-{rank}", first + rank)
            for rank in range(int(values["job"]["nprocPerNode"]))]


def _lines(*parts) -> str:
    """Template lines; None and False leave a line out, as an `if` around it does."""
    return "\n".join(part for part in parts if part)


def _then_users(text: str, items) -> str:
    """The chart's list entries, then `{{- with .Values.x }}{{ toYaml . }}{{- end }}`: the user's."""
    return text + nindent(0, to_yaml(items)) if items else text


def _with(value, key_line: str, spaces: int) -> str:
    """`{{- with .Values.x }}KEY:{{- toYaml . | nindent N }}{{- end }}`."""
    return key_line + nindent(spaces, to_yaml(value)) if value else ""


# ---------------------------------------------------------------- the PyTorchJob
def trainer_command(values: dict, config_path: str = CONFIG_PATH, python: str = "python") -> list[str]:
    """`kubetrain.command`, for the pods and `kubetrain run`'s processes alike: torchrun reads PET_* (set by
    the operator) for nodes, rank and rendezvous; trainer.worker.launch is torchrun that keeps the workers'
    exit codes for restartPolicy ExitCode, and the launcher a TrainJob needs (Trainer v2 sets only PET_*)."""
    job = values["job"]
    torchrun = ["-m", "trainer.worker.launch"] if (int(job["nprocPerNode"]) > 1 or job["elastic"]["enabled"]
                                                   or job["kind"] == "TrainJob") else []
    return [python, *torchrun, "-m", "trainer", "--config", config_path]


def resource_list(values: dict) -> str:
    """`kubetrain.resourceList`."""
    resources = values["resources"]
    gpus = int(resources["gpu"])
    return _lines(f"cpu: {quote(go_string(resources['cpu']))}",
                  f"memory: {quote(go_string(resources['memory']))}",
                  gpus > 0 and f"nvidia.com/gpu: {quote(str(gpus))}")


def trainer_env(name: str, values: dict) -> str:
    """`kubetrain.env`."""
    secret = s3_secret_name(name, values)
    lines = ["# A writable home on the read-only root filesystem (torch hub, triton caches).",
             "- name: HOME", "  value: /tmp"]
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            lines += [f"- name: {key}", "  valueFrom:", "    secretKeyRef:", f"      name: {quote(secret)}",
                      f"      key: {key}"]
    for key, value in sorted((values.get("ncclEnv") or {}).items()):
        lines += [f"- name: {key}", f"  value: {quote(go_string(value))}"]
    return _then_users("\n".join(lines), values.get("env"))


def volume_mounts(values: dict) -> str:
    """`kubetrain.volumeMounts`."""
    text = "\n".join(["- name: config", f"  mountPath: {CONFIG_DIR}", "  readOnly: true",
                      "- name: dshm", "  mountPath: /dev/shm", "- name: tmp", "  mountPath: /tmp"])
    return _then_users(text, values.get("volumeMounts"))


def volumes(name: str, values: dict) -> str:
    """`kubetrain.volumes`."""
    shm_limit = values["shm"]["sizeLimit"]
    text = _lines("- name: config", "  configMap:", f"    name: {name}-config",
                  "- name: dshm", "  emptyDir:", "    medium: Memory",
                  shm_limit and f"    sizeLimit: {quote(shm_limit)}",
                  "- name: tmp", "  emptyDir: {}")
    return _then_users(text, values.get("volumes"))


def pod_metadata(name: str, values: dict) -> str:
    """`kubetrain.podMetadata`."""
    labels = {**(values.get("podLabels") or {}), **common_labels(name), **trainer_selector_labels(name)}
    annotations = {"sidecar.istio.io/inject": "false", **(values.get("podAnnotations") or {})}
    return "labels:" + nindent(2, to_yaml(labels)) + "\nannotations:" + nindent(2, to_yaml(annotations))


def pod_template(name: str, values: dict) -> str:
    """`kubetrain.podTemplate`: the Master's and the Workers' pods."""
    ports = ["- name: pytorchjob-port", f"  containerPort: {int(values['job']['masterPort'])}", "  protocol: TCP"]
    if values["metrics"]["enabled"]:
        for port_name, port in metrics_port_names(values):
            ports += [f"- name: {port_name}", f"  containerPort: {port}", "  protocol: TCP"]
    command = "\n".join(f"- {part}" for part in trainer_command(values))
    return _lines(
        "metadata:" + nindent(2, pod_metadata(name, values)),
        "spec:",
        f"  serviceAccountName: {quote(service_account_name(name, values))}",
        "  automountServiceAccountToken: false",
        f"  terminationGracePeriodSeconds: {int(values['terminationGracePeriodSeconds'])}",
        _with(values.get("podSecurityContext"), "  securityContext:", 4),
        _image_pull_secrets(values, 2),
        values.get("priorityClassName") and f"  priorityClassName: {quote(values['priorityClassName'])}",
        values.get("schedulerName") and f"  schedulerName: {quote(values['schedulerName'])}",
        _with(values.get("nodeSelector"), "  nodeSelector:", 4),
        _with(values.get("affinity"), "  affinity:", 4),
        _with(values.get("tolerations"), "  tolerations:", 4),
        "  containers:",
        "    - name: pytorch",
        f"      image: {quote(image(values))}",
        f"      imagePullPolicy: {values['image']['pullPolicy']}",
        "      command:" + nindent(8, command),
        "      env:" + nindent(8, trainer_env(name, values)),
        "      ports:" + nindent(8, "\n".join(ports)),
        "      resources:",
        "        requests:" + nindent(10, resource_list(values)),
        "        limits:" + nindent(10, resource_list(values)),
        _with(values.get("securityContext"), "      securityContext:", 8),
        "      volumeMounts:" + nindent(8, volume_mounts(values)),
        "  volumes:" + nindent(4, volumes(name, values)),
    )


def _image_pull_secrets(values: dict, spaces: int) -> str:
    secrets, pad = values["image"].get("pullSecrets"), " " * spaces
    return _lines(f"{pad}imagePullSecrets:", *(f"{pad}  - name: {quote(secret)}" for secret in secrets)) if secrets else ""


def run_policy(job: dict) -> str:
    scheduling = job["schedulingPolicy"]
    gang = scheduling and (scheduling["queue"] or scheduling["priorityClass"] or int(scheduling["minAvailable"]) > 0)
    return _lines(
        "  runPolicy:",
        f"    backoffLimit: {int(job['backoffLimit'])}",
        f"    cleanPodPolicy: {job['cleanPodPolicy']}",
        f"    suspend: {json.dumps(job['suspend'])}",
        job.get("ttlSecondsAfterFinished") is not None and
        f"    ttlSecondsAfterFinished: {int(job['ttlSecondsAfterFinished'])}",
        job.get("activeDeadlineSeconds") is not None and
        f"    activeDeadlineSeconds: {int(job['activeDeadlineSeconds'])}",
        gang and "    schedulingPolicy:",
        gang and scheduling["queue"] and f"      queue: {quote(scheduling['queue'])}",
        gang and scheduling["priorityClass"] and f"      priorityClass: {quote(scheduling['priorityClass'])}",
        gang and int(scheduling["minAvailable"]) > 0 and f"      minAvailable: {int(scheduling['minAvailable'])}",
    )


def pytorch_job(name: str, values: dict) -> str:
    """templates/pytorchjob.yaml: Master x1 + Worker x(nodes-1), DESIGN §3.3."""
    job = values["job"]
    nodes, elastic = int(job["nodes"]), job["elastic"]
    template = pod_template(name, values)
    replica = lambda kind, count: _lines(  # noqa: E731
        f"    {kind}:", f"      replicas: {count}", f"      restartPolicy: {job['restartPolicy']}",
        "      template:" + nindent(8, template))
    queue = values["kueue"]["queueName"]
    return _lines(
        "apiVersion: kubeflow.org/v1",
        "kind: PyTorchJob",
        "metadata:",
        f"  name: {quote(name)}",
        "  labels:" + nindent(4, labels_text(name)),
        queue and f"    kueue.x-k8s.io/queue-name: {quote(queue)}",
        "spec:",
        '  # An integer count as the CRD\'s string field: never "auto", so WORLD_SIZE adds up.',
        f"  nprocPerNode: {quote(str(int(job['nprocPerNode'])))}",
        run_policy(job),
        elastic["enabled"] and _lines(
            "  elasticPolicy:",
            "    rdzvBackend: c10d",
            "    # Rendezvous on the master, which exists for the job's whole life.",
            f"    rdzvHost: {name}-master-0",
            f"    rdzvPort: {int(job['masterPort'])}",
            f"    minReplicas: {int(elastic['minNodes'])}",
            f"    maxReplicas: {max_nodes(job)}",
            f"    maxRestarts: {int(elastic['maxRestarts'])}"),
        "  pytorchReplicaSpecs:",
        replica("Master", 1),
        nodes > 1 and replica("Worker", nodes - 1),
    )


def train_job(name: str, values: dict) -> str:
    """templates/trainjob.yaml: a Kubeflow Trainer v2 TrainJob on job.runtime, the pod settings patched in."""
    job = values["job"]
    queue = values["kueue"]["queueName"]
    command = "\n".join(f"- {part}" for part in trainer_command(values))
    pod_spec = _lines(
        f"serviceAccountName: {quote(service_account_name(name, values))}",
        f"terminationGracePeriodSeconds: {int(values['terminationGracePeriodSeconds'])}",
        _with(values.get("podSecurityContext"), "securityContext:", 2),
        _image_pull_secrets(values, 0),
        _with(values.get("nodeSelector"), "nodeSelector:", 2),
        _with(values.get("affinity"), "affinity:", 2),
        _with(values.get("tolerations"), "tolerations:", 2),
        "containers:",
        "  - name: node",
        _with(values.get("securityContext"), "    securityContext:", 6),
        "    volumeMounts:" + nindent(6, volume_mounts(values)),
        "volumes:" + nindent(2, volumes(name, values)),
    )
    return _lines(
        "# Kubeflow Trainer v2: the runtime's torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and",
        "# PET_MASTER_ADDR/PORT; torchrun (our launcher) turns them into each rank's RANK and WORLD_SIZE.",
        "apiVersion: trainer.kubeflow.org/v1alpha1",
        "kind: TrainJob",
        "metadata:",
        f"  name: {quote(name)}",
        "  labels:" + nindent(4, labels_text(name)),
        queue and f"    kueue.x-k8s.io/queue-name: {quote(queue)}",
        "spec:",
        "  runtimeRef:",
        "    apiGroup: trainer.kubeflow.org",
        "    kind: ClusterTrainingRuntime",
        f"    name: {quote(job['runtime'])}",
        f"  suspend: {json.dumps(job['suspend'])}",
        job.get("activeDeadlineSeconds") is not None and
        f"  activeDeadlineSeconds: {int(job['activeDeadlineSeconds'])}",
        "  trainer:",
        f"    image: {quote(image(values))}",
        "    command:" + nindent(6, command),
        f"    numNodes: {int(job['nodes'])}",
        f"    numProcPerNode: {int(job['nprocPerNode'])}",
        "    resourcesPerNode:",
        "      requests:" + nindent(8, resource_list(values)),
        "      limits:" + nindent(8, resource_list(values)),
        "    env:" + nindent(6, trainer_env(name, values)),
        "  # What the trainer field cannot say goes to the runtime's `node` job and its `node` container.",
        "  runtimePatches:",
        "    - manager: kubetrain.io/chart",
        "      trainingRuntimeSpec:",
        "        template:",
        "          spec:",
        "            replicatedJobs:",
        "              - name: node",
        "                template:",
        "                  spec:",
        "                    template:",
        "                      metadata:" + nindent(24, pod_metadata(name, values)),
        "                      spec:" + nindent(24, pod_spec),
    )


# ---------------------------------------------------------------- the other objects
def _header(api_version: str, kind: str, name: str, labels: str) -> str:
    return _lines(f"apiVersion: {api_version}", f"kind: {kind}", "metadata:", f"  name: {name}",
                  "  labels:" + nindent(4, labels))


def service_account(name: str, values: dict) -> str:
    """templates/serviceaccount.yaml."""
    return _lines(
        _header("v1", "ServiceAccount", quote(name), labels_text(name)),
        _with(values["serviceAccount"]["annotations"], "  annotations:", 4),
        "# The trainer never calls the Kubernetes API.",
        "automountServiceAccountToken: false",
    )


def user_role(name: str, values: dict) -> str:
    """templates/role.yaml: the text after its header is the template's, verbatim."""
    rules = (chart_dir() / "templates" / "role.yaml").read_text(encoding="utf-8")
    rules = rules[rules.index("\nrules:\n") + 1:rules.rindex("\n{{- end }}")]
    return _lines(
        "# What `kubetrain submit/status/logs/list/delete` needs in this namespace; no Secrets.",
        _header("rbac.authorization.k8s.io/v1", "Role", quote(f"{name}-kubetrain-user"), labels_text(name)),
        rules,
    )


def user_role_binding(name: str, values: dict) -> str:
    """templates/rolebinding.yaml."""
    return _lines(
        _header("rbac.authorization.k8s.io/v1", "RoleBinding", quote(f"{name}-kubetrain-user"), labels_text(name)),
        "roleRef:",
        "  apiGroup: rbac.authorization.k8s.io",
        "  kind: Role",
        f"  name: {quote(f'{name}-kubetrain-user')}",
        "subjects:" + nindent(2, to_yaml(values["rbac"]["subjects"])),
    )


def dev_secret(name: str, values: dict) -> str:
    """templates/secret-s3-dev.yaml."""
    dev = values["s3"]["devSecret"]
    return _lines(
        _header("v1", "Secret", f"{name}-s3-dev", labels_text(name)),
        "type: Opaque",
        "stringData:",
        f"  AWS_ACCESS_KEY_ID: {quote(dev['accessKeyId'])}",
        f"  AWS_SECRET_ACCESS_KEY: {quote(dev['secretAccessKey'])}",
    )


def trainer_config_map(name: str, values: dict) -> str:
    """templates/configmap.yaml: the file `python -m trainer --config` reads."""
    return _lines(
        _header("v1", "ConfigMap", f"{name}-config", labels_text(name)),
        "data:",
        "  config.json: |" + nindent(4, to_pretty_json(trainer_config_document(name, values))),
    )


def dashboard_config_map(name: str, values: dict) -> str:
    """templates/configmap-dashboard.yaml: picked up by Grafana's dashboard sidecar."""
    labels = {"grafana_dashboard": "1", **(values["metrics"]["dashboard"].get("labels") or {}), **common_labels(name)}
    return _lines(
        _header("v1", "ConfigMap", f"{name}-dashboard", to_yaml(labels)),
        "data:",
        f"  kubetrain-{name}.json: |" + nindent(4, chart_file("files/dashboard.json", name)).rstrip(),
    )


def metrics_service(name: str, values: dict) -> str:
    """templates/service-metrics.yaml: headless, one DNS record per trainer pod."""
    ports = [f"    - name: {port_name}\n      port: {port}\n      targetPort: {port}\n      protocol: TCP"
             for port_name, port in metrics_port_names(values)]
    return _lines(
        _header("v1", "Service", f"{name}-metrics", labels_text(name)),
        "    app.kubernetes.io/component: metrics",
        "spec:",
        "  clusterIP: None",
        "  selector:" + nindent(4, trainer_selector_labels_text(name)),
        "  ports:",
        *ports,
    )


def pod_monitor(name: str, values: dict) -> str:
    """templates/podmonitor.yaml."""
    monitor = values["metrics"]["podMonitor"]
    labels = {**(monitor.get("labels") or {}), **common_labels(name)}
    by_number = values["job"]["kind"] == "TrainJob"  # a TrainJob's containers have no named ports
    endpoints = [f"    - {f'portNumber: {port}' if by_number else f'port: {port_name}'}\n      path: /metrics\n"
                 f"      interval: {monitor['interval']}" for port_name, port in metrics_port_names(values)]
    return _lines(
        _header("monitoring.coreos.com/v1", "PodMonitor", quote(name), to_yaml(labels)),
        "spec:",
        "  selector:",
        "    matchLabels:" + nindent(6, trainer_selector_labels_text(name)),
        "  podTargetLabels:",
        "    - training.kubeflow.org/replica-type",
        "    - training.kubeflow.org/replica-index",
        "  podMetricsEndpoints:",
        *endpoints,
    )


def prometheus_rule(name: str, values: dict) -> str:
    """templates/prometheusrule.yaml: spec.groups is files/alert-rules.yaml's groups."""
    rules = yaml.load(chart_file("files/alert-rules.yaml", name), Loader=HelmValuesLoader) or {}  # as fromYaml
    labels = {**(values["metrics"]["prometheusRule"].get("labels") or {}), **common_labels(name)}
    return _lines(
        _header("monitoring.coreos.com/v1", "PrometheusRule", quote(name), to_yaml(labels)),
        "spec:",
        "  groups:" + nindent(4, to_yaml(rules.get("groups"))),
    )


def test_pod(name: str, values: dict) -> str:
    """templates/tests/test-config.yaml: `helm test` checks the image accepts the config."""
    script = nindent(10, chart_text("files/helm-test-check.py").removesuffix("\n"))
    return _lines(
        _header("v1", "Pod", f"{name}-test", labels_text(name)),
        "    app.kubernetes.io/component: test",
        "  annotations:",
        "    helm.sh/hook: test",
        "    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded",
        '    sidecar.istio.io/inject: "false"',
        "spec:",
        "  restartPolicy: Never",
        f"  serviceAccountName: {quote(service_account_name(name, values))}",
        "  automountServiceAccountToken: false",
        _with(values.get("podSecurityContext"), "  securityContext:", 4),
        _image_pull_secrets(values, 2),
        "  containers:",
        "    - name: check-config",
        f"      image: {quote(image(values))}",
        f"      imagePullPolicy: {values['image']['pullPolicy']}",
        "      command:",
        "        - python",
        "        - -c",
        "        - |" + script,
        "      env:",
        "        - name: HOME",
        "          value: /tmp",
        "      resources:",
        "        requests:",
        "          cpu: 100m",
        "          memory: 512Mi",
        "        limits:",
        '          cpu: "1"',
        "          memory: 512Mi",
        _with(values.get("securityContext"), "      securityContext:", 8),
        "      volumeMounts:",
        "        - name: config",
        f"          mountPath: {CONFIG_DIR}",
        "          readOnly: true",
        "        - name: tmp",
        "          mountPath: /tmp",
        "  volumes:",
        "    - name: config",
        "      configMap:",
        f"        name: {name}-config",
        "    - name: tmp",
        "      emptyDir: {}",
    )


# ---------------------------------------------------------------- the whole release
def render_documents(name: str, values: dict, include_tests: bool = True) -> list[tuple[str, str]]:
    """(template path, text) in `helm template`'s order; values must be resolved and validated."""
    check_values(name, values)
    metrics = values["metrics"]
    wanted = [
        ("serviceaccount.yaml", service_account, values["serviceAccount"]["create"]),
        ("secret-s3-dev.yaml", dev_secret, values["s3"]["devSecret"]["enabled"] and not values["s3"]["credentialsSecret"]),
        ("configmap-dashboard.yaml", dashboard_config_map, metrics["enabled"] and metrics["dashboard"]["enabled"]),
        ("configmap.yaml", trainer_config_map, True),
        ("role.yaml", user_role, values["rbac"]["create"]),
        ("rolebinding.yaml", user_role_binding, values["rbac"]["create"] and values["rbac"]["subjects"]),
        ("service-metrics.yaml", metrics_service, metrics["enabled"]),
        ("podmonitor.yaml", pod_monitor, metrics["enabled"] and metrics["podMonitor"]["enabled"]),
        ("prometheusrule.yaml", prometheus_rule, metrics["enabled"] and metrics["prometheusRule"]["enabled"]),
        ("pytorchjob.yaml", pytorch_job, values["job"]["kind"] == "PyTorchJob"),
        ("trainjob.yaml", train_job, values["job"]["kind"] == "TrainJob"),
        ("tests/test-config.yaml", test_pod, include_tests),
    ]
    try:
        return [(f"templates/{path}", build(name, values).strip()) for path, build, enabled in wanted if enabled]
    except KeyError as e:  # a section removed with `--set key=null`: helm fails on it too
        raise UserError(f"values: the key {e.args[0]!r} is missing (was it set to null?)") from None


def render_manifests(name: str, values: dict, include_tests: bool = True) -> list[tuple[str, dict]]:
    """The rendered objects, read back from the text as Helm's YAML reader types it."""
    return [(path, yaml.load(text, Loader=HelmValuesLoader))
            for path, text in render_documents(name, values, include_tests)]


def render(name: str, values: dict, include_tests: bool = True) -> str:
    """What `helm template NAME` prints: each document after `---` and a `# Source:` line."""
    chart = chart_metadata()["name"]
    return "".join(f"---\n# Source: {chart}/{path}\n{text}\n"
                   for path, text in render_documents(name, values, include_tests))
