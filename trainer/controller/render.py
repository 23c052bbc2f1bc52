"""`kubetrain render`: the chart's manifests from the chart's values, without helm.

Every function below mirrors one template of helm/kubetrain/templates (named in
its docstring); `helm template NAME helm/kubetrain -f v.yaml` and
`kubetrain render NAME -f v.yaml` give the same objects, which
tests/test_chart_parity.py checks with the real helm binary. Change both sides
together.

Helm reads numbers from values files as float64, so the templates never print
a number with `%v` (1000000 would become 1e+06): integers go through `int`,
free-form scalars through toJson. `go_string` is the Python side of that.
"""

from __future__ import annotations

import copy
import decimal
import functools
import hashlib
import json

import yaml

from trainer.chart import chart_dir
from trainer.config import EXPERIMENT_NAME, trainer_config_document
from trainer.errors import UserError
from trainer.values import HelmValuesLoader

CONFIG_DIR = "/etc/kubetrain"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
MAX_NAME = 63  # DNS-1035 label: the operator names pods and Services `<job>-worker-<i>`
MAX_RELEASE_NAME = 53  # Helm refuses longer release names
TEST_POD_SCRIPT = """\
from trainer.config import load_trainer_config
from trainer.tasks import get_task
config = load_trainer_config("/etc/kubetrain/config.json")
if config.training.task != "custom":
    get_task(config.training.task)
print(f"kubetrain config for {config.experiment} is valid (task {config.training.task})")
"""


@functools.cache
def chart_metadata() -> dict:
    with open(chart_dir() / "Chart.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def chart_file(relative: str, experiment: str) -> str:
    """A file shipped in the chart with __EXPERIMENT__ and __DASHBOARD_UID__ filled in (`.Files.Get | replace`)."""
    text = (chart_dir() / relative).read_text(encoding="utf-8")
    return text.replace("__EXPERIMENT__", experiment).replace("__DASHBOARD_UID__", dashboard_uid(experiment))


def dashboard_uid(experiment: str) -> str:
    """The `kubetrain.dashboardUid` helper: one Grafana uid per release, within Grafana's 40 characters."""
    return "kubetrain-" + hashlib.sha256(experiment.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- scalars
def go_string(value) -> str:
    """The `kubetrain.string` helper: strings as they are, other scalars as Go's toJson prints them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and abs(value) < 1e21:  # --set gives int64; files give float64 (same digits)
        return str(value)
    x = float(value)
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    if x != 0 and (abs(x) < 1e-6 or abs(x) >= 1e21):  # encoding/json switches to exponents, e-07 -> e-7
        mantissa, exponent = repr(x).split("e")
        return f"{mantissa}e{'-' if int(exponent) < 0 else '+'}{abs(int(exponent))}"
    return format(decimal.Decimal(repr(x)), "f")


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
    """`kubetrain.validate`: what the schema cannot say, with the chart's messages, in its order."""
    if len(name) > MAX_RELEASE_NAME:
        raise UserError(f"experiment name {json.dumps(name)} is longer than {MAX_RELEASE_NAME} characters, "
                        "Helm's limit for a release name")
    if not EXPERIMENT_NAME.match(name):
        raise UserError(f"experiment name {json.dumps(name)} must be a DNS-1035 label: lowercase letters, digits "
                        "and '-', starting with a letter and ending with a letter or digit")
    job = values["job"]
    last_worker = f"{name}-worker-{max(0, max_nodes(job) - 2)}"
    if len(last_worker) > MAX_NAME:
        raise UserError(f'experiment name "{name}" is too long: pod name "{last_worker}" would exceed 63 characters')
    nodes, elastic = int(job["nodes"]), job["elastic"]
    if elastic["enabled"]:
        if int(elastic["minNodes"]) > nodes:
            raise UserError(f"job.elastic.minNodes ({int(elastic['minNodes'])}) must not exceed job.nodes ({nodes})")
        if max_nodes(job) < nodes:
            raise UserError(f"job.elastic.maxNodes ({int(elastic['maxNodes'])}) must be 0 or at least "
                            f"job.nodes ({nodes})")
    if values["metrics"]["enabled"]:
        first, nproc = int(values["metrics"]["port"]), int(job["nprocPerNode"])
        last = first + nproc - 1
        if last > 65535:
            raise UserError(f"metrics.port ({first}) + job.nprocPerNode ({nproc}) - 1 exceeds 65535: "
                            "local rank N listens on metrics.port + N")
        if first <= int(job["masterPort"]) <= last:
            raise UserError(f"job.masterPort ({int(job['masterPort'])}) collides with the metrics ports "
                            f"{first}-{last} (metrics.port + local rank)")
    s3 = values["s3"]
    if s3["devSecret"]["enabled"] and s3["credentialsSecret"]:
        raise UserError("s3.devSecret.enabled and s3.credentialsSecret are exclusive: "
                        "use the existing Secret or the development one")
    if s3["devSecret"]["enabled"] and not (s3["devSecret"]["accessKeyId"] and s3["devSecret"]["secretAccessKey"]):
        raise UserError("s3.devSecret.enabled needs s3.devSecret.accessKeyId and s3.devSecret.secretAccessKey")


# ---------------------------------------------------------------- labels
def selector_labels(name: str) -> dict:
    return {"app.kubernetes.io/name": chart_metadata()["name"], "app.kubernetes.io/instance": name}


def common_labels(name: str) -> dict:
    """`kubetrain.labels`."""
    meta = chart_metadata()
    chart = f"{meta['name']}-{meta['version']}".replace("+", "_")[:63].removesuffix("-")
    return {
        "helm.sh/chart": chart,
        **selector_labels(name),
        "app.kubernetes.io/version": str(meta["appVersion"]),
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/part-of": "kubetrain",
        "kubetrain.io/experiment": name,
    }


def trainer_selector_labels(name: str) -> dict:
    return {**selector_labels(name), "app.kubernetes.io/component": "trainer"}


def metadata(name: str, labels: dict | None = None, **extra) -> dict:
    return {"name": name, "labels": labels, **extra}


def image(values: dict) -> str:
    return f"{values['image']['repository']}:{values['image']['tag'] or chart_metadata()['appVersion']}"


def metrics_port_names(values: dict) -> list[tuple[str, int]]:
    first = int(values["metrics"]["port"])
    return [("metrics" if rank == 0 else f"metrics-{rank}", first + rank)
            for rank in range(int(values["job"]["nprocPerNode"]))]


# ---------------------------------------------------------------- the PyTorchJob
def trainer_command(values: dict) -> list[str]:
    """`kubetrain.command`: torchrun reads PET_* (set by the operator) for nodes, rank and rendezvous;
    trainer.worker.launch is torchrun that keeps the workers' exit codes for restartPolicy ExitCode."""
    job = values["job"]
    torchrun = ["python", "-m", "trainer.worker.launch"] if int(job["nprocPerNode"]) > 1 or job["elastic"]["enabled"] else ["python"]
    return [*torchrun, "-m", "trainer", "--config", CONFIG_PATH]


def resource_list(values: dict) -> dict:
    resources = values["resources"]
    out = {"cpu": go_string(resources["cpu"]), "memory": go_string(resources["memory"])}
    if int(resources["gpu"]) > 0:
        out["nvidia.com/gpu"] = str(int(resources["gpu"]))
    return out


def trainer_env(name: str, values: dict) -> list[dict]:
    env = [{"name": "HOME", "value": "/tmp"}]
    secret = s3_secret_name(name, values)
    if secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": key, "value": go_string(value)} for key, value in sorted((values.get("ncclEnv") or {}).items())]
    return env + copy.deepcopy(values.get("env") or [])


def pod_template(name: str, values: dict) -> dict:
    """`kubetrain.podTemplate`: the Master's and the Workers' pods."""
    labels = {**(values.get("podLabels") or {}), **common_labels(name), **trainer_selector_labels(name)}
    annotations = {"sidecar.istio.io/inject": "false", **(values.get("podAnnotations") or {})}
    spec: dict = {
        "serviceAccountName": service_account_name(name, values),
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": int(values["terminationGracePeriodSeconds"]),
    }
    optional = {
        "securityContext": values.get("podSecurityContext"),
        "imagePullSecrets": [{"name": secret} for secret in values["image"].get("pullSecrets") or []],
        "priorityClassName": values.get("priorityClassName"),
        "schedulerName": values.get("schedulerName"),
        "nodeSelector": values.get("nodeSelector"),
        "affinity": values.get("affinity"),
        "tolerations": values.get("tolerations"),
    }
    spec.update({key: copy.deepcopy(value) for key, value in optional.items() if value})
    ports = [{"name": "pytorchjob-port", "containerPort": int(values["job"]["masterPort"]), "protocol": "TCP"}]
    if values["metrics"]["enabled"]:
        ports += [{"name": port_name, "containerPort": port, "protocol": "TCP"}
                  for port_name, port in metrics_port_names(values)]
    container = {
        "name": "pytorch",
        "image": image(values),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "command": trainer_command(values),
        "env": trainer_env(name, values),
        "ports": ports,
        "resources": {"requests": resource_list(values), "limits": resource_list(values)},
    }
    if values.get("securityContext"):
        container["securityContext"] = copy.deepcopy(values.get("securityContext"))
    container["volumeMounts"] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        *copy.deepcopy(values.get("volumeMounts") or []),
    ]
    shm = {"medium": "Memory"}
    if values["shm"]["sizeLimit"]:
        shm["sizeLimit"] = values["shm"]["sizeLimit"]
    spec["containers"] = [container]
    spec["volumes"] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "dshm", "emptyDir": shm},
        {"name": "tmp", "emptyDir": {}},
        *copy.deepcopy(values.get("volumes") or []),
    ]
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def run_policy(job: dict) -> dict:
    policy = {"backoffLimit": int(job["backoffLimit"]), "cleanPodPolicy": job["cleanPodPolicy"],
              "suspend": job["suspend"]}
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if job.get(key) is not None:
            policy[key] = int(job[key])
    scheduling = job["schedulingPolicy"]
    gang = {key: scheduling[key] for key in ("queue", "priorityClass") if scheduling[key]}
    if int(scheduling["minAvailable"]) > 0:
        gang["minAvailable"] = int(scheduling["minAvailable"])
    if gang:
        policy["schedulingPolicy"] = gang
    return policy


def pytorch_job(name: str, values: dict) -> dict:
    """templates/pytorchjob.yaml: Master x1 + Worker x(nodes-1), DESIGN §3.3."""
    job = values["job"]
    labels = common_labels(name)
    if values["kueue"]["queueName"]:
        labels["kueue.x-k8s.io/queue-name"] = values["kueue"]["queueName"]
    spec: dict = {"nprocPerNode": str(int(job["nprocPerNode"])), "runPolicy": run_policy(job)}
    if job["elastic"]["enabled"]:
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "rdzvHost": f"{name}-master-0",
            "rdzvPort": int(job["masterPort"]),
            "minReplicas": int(job["elastic"]["minNodes"]),
            "maxReplicas": max_nodes(job),
            "maxRestarts": int(job["elastic"]["maxRestarts"]),
        }
    replicas = {"Master": 1}
    if int(job["nodes"]) > 1:
        replicas["Worker"] = int(job["nodes"]) - 1
    spec["pytorchReplicaSpecs"] = {
        kind: {"replicas": count, "restartPolicy": job["restartPolicy"], "template": pod_template(name, values)}
        for kind, count in replicas.items()
    }
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata(name, labels), "spec": spec}


# ---------------------------------------------------------------- the other objects
def service_account(name: str, values: dict) -> dict:
    """templates/serviceaccount.yaml."""
    meta = metadata(name, common_labels(name))
    if values["serviceAccount"]["annotations"]:
        meta["annotations"] = dict(values["serviceAccount"]["annotations"])
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


# templates/role.yaml: what the kubetrain cluster verbs need in one namespace, and no Secrets.
USER_ROLE_RULES = [
    (["kubeflow.org"], ["pytorchjobs"], ["get", "list", "watch", "create", "patch", "update", "delete"]),
    (["kubeflow.org"], ["pytorchjobs/status"], ["get"]),
    ([""], ["configmaps", "services", "serviceaccounts"], ["get", "list", "watch", "create", "patch", "update", "delete"]),
    ([""], ["pods"], ["get", "list", "watch", "delete"]),
    ([""], ["pods/log", "events"], ["get", "list", "watch"]),
    (["monitoring.coreos.com"], ["podmonitors", "prometheusrules"],
     ["get", "list", "watch", "create", "patch", "update", "delete"]),
]


def user_role(name: str, values: dict) -> dict:
    """templates/role.yaml."""
    rules = [{"apiGroups": groups, "resources": resources, "verbs": verbs}
             for groups, resources, verbs in USER_ROLE_RULES]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(f"{name}-kubetrain-user", common_labels(name)), "rules": rules}


def user_role_binding(name: str, values: dict) -> dict:
    """templates/rolebinding.yaml."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": metadata(f"{name}-kubetrain-user", common_labels(name)),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{name}-kubetrain-user"},
            "subjects": copy.deepcopy(values["rbac"]["subjects"])}


def dev_secret(name: str, values: dict) -> dict:
    """templates/secret-s3-dev.yaml."""
    dev = values["s3"]["devSecret"]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata(f"{name}-s3-dev", common_labels(name)),
            "type": "Opaque",
            "stringData": {"AWS_ACCESS_KEY_ID": dev["accessKeyId"], "AWS_SECRET_ACCESS_KEY": dev["secretAccessKey"]}}


def trainer_config_map(name: str, values: dict) -> dict:
    """templates/configmap.yaml: the file `python -m trainer --config` reads."""
    document = json.dumps(trainer_config_document(name, values), indent=2, sort_keys=True, ensure_ascii=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{name}-config", common_labels(name)),
            "data": {"config.json": document + "\n"}}


def dashboard_config_map(name: str, values: dict) -> dict:
    """templates/configmap-dashboard.yaml: picked up by Grafana's dashboard sidecar."""
    labels = {"grafana_dashboard": "1", **(values["metrics"]["dashboard"].get("labels") or {}), **common_labels(name)}
    text = chart_file("files/dashboard.json", name).rstrip("\n") + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{name}-dashboard", labels),
            "data": {f"kubetrain-{name}.json": text}}


def metrics_service(name: str, values: dict) -> dict:
    """templates/service-metrics.yaml: headless, one DNS record per trainer pod."""
    labels = {**common_labels(name), "app.kubernetes.io/component": "metrics"}
    ports = [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
             for port_name, port in metrics_port_names(values)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(f"{name}-metrics", labels),
            "spec": {"clusterIP": "None", "selector": trainer_selector_labels(name), "ports": ports}}


def pod_monitor(name: str, values: dict) -> dict:
    """templates/podmonitor.yaml."""
    monitor = values["metrics"]["podMonitor"]
    labels = {**(monitor.get("labels") or {}), **common_labels(name)}
    endpoints = [{"port": port_name, "path": "/metrics", "interval": monitor["interval"]}
                 for port_name, _ in metrics_port_names(values)]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": metadata(name, labels),
            "spec": {"selector": {"matchLabels": trainer_selector_labels(name)},
                     "podTargetLabels": ["training.kubeflow.org/replica-type", "training.kubeflow.org/replica-index"],
                     "podMetricsEndpoints": endpoints}}


def prometheus_rule(name: str, values: dict) -> dict:
    """templates/prometheusrule.yaml: spec.groups is files/alert-rules.yaml's groups."""
    rules = yaml.load(chart_file("files/alert-rules.yaml", name), Loader=HelmValuesLoader) or {}  # as fromYaml
    labels = {**(values["metrics"]["prometheusRule"].get("labels") or {}), **common_labels(name)}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": metadata(name, labels),
            "spec": {"groups": rules.get("groups")}}


def test_pod(name: str, values: dict) -> dict:
    """templates/tests/test-config.yaml: `helm test` checks the image accepts the config."""
    annotations = {"helm.sh/hook": "test", "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
                   "sidecar.istio.io/inject": "false"}
    meta = metadata(f"{name}-test", {**common_labels(name), "app.kubernetes.io/component": "test"},
                    annotations=annotations)
    spec: dict = {"restartPolicy": "Never", "serviceAccountName": service_account_name(name, values),
                  "automountServiceAccountToken": False}
    if values.get("podSecurityContext"):
        spec["securityContext"] = copy.deepcopy(values.get("podSecurityContext"))
    if values["image"].get("pullSecrets"):
        spec["imagePullSecrets"] = [{"name": secret} for secret in values["image"]["pullSecrets"]]
    container = {
        "name": "check-config", "image": image(values), "imagePullPolicy": values["image"]["pullPolicy"],
        "command": ["python", "-c", TEST_POD_SCRIPT],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
    }
    if values.get("securityContext"):
        container["securityContext"] = copy.deepcopy(values.get("securityContext"))
    container["volumeMounts"] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                 {"name": "tmp", "mountPath": "/tmp"}]
    spec["containers"] = [container]
    spec["volumes"] = [{"name": "config", "configMap": {"name": f"{name}-config"}},
                       {"name": "tmp", "emptyDir": {}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


# ---------------------------------------------------------------- the whole release
def render_manifests(name: str, values: dict, include_tests: bool = True) -> list[tuple[str, dict]]:
    """(template path, object) in `helm template`'s order; values must be resolved and validated."""
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
        ("pytorchjob.yaml", pytorch_job, True),
        ("tests/test-config.yaml", test_pod, include_tests),
    ]
    try:
        return [(f"templates/{path}", build(name, values)) for path, build, enabled in wanted if enabled]
    except KeyError as e:  # a section removed with `--set key=null`: helm fails on it too
        raise UserError(f"values: the key {e.args[0]!r} is missing (was it set to null?)") from None


class _ManifestDumper(yaml.SafeDumper):
    """Block style, multi-line strings as `|` literals, keys in the order they were built."""


def _represent_str(dumper: yaml.SafeDumper, text: str):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml_stream(manifests: list[tuple[str, dict]]) -> str:
    chart = chart_metadata()["name"]
    parts = []
    for path, obj in manifests:
        body = yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=False, allow_unicode=True, width=1 << 16)
        parts.append(f"---\n# Source: {chart}/{path}\n{body}")
    return "".join(parts)


def render(name: str, values: dict, include_tests: bool = True) -> str:
    return to_yaml_stream(render_manifests(name, values, include_tests))
