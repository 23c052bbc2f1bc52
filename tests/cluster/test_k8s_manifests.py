"""The kind development stack under k8s/, checked against a real kube-apiserver.

Every manifest of a built-in kind passes a server-side dry run (admission
included: the experiment namespace enforces Pod Security "restricted"); the
pinned training-operator kustomization builds and dry-runs where the module
copy is at hand; the chart on the dev-stack values validates against the
PyTorchJob CRD. The consistency checks between the stack's pieces (selectors,
credentials, endpoints) need no cluster and run everywhere helm is found.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import run_cli, tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CHART = REPO / "helm" / "kubetrain"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
KIND_VALUES = K8S / "values-kind.yaml"
MONITORING_VALUES = K8S / "monitoring" / "kube-prometheus-stack-values.yaml"

# Files under k8s/ that are not Kubernetes API objects, by what identifies them.
CONFIG_API_GROUPS = ("kind.x-k8s.io/", "kustomize.config.k8s.io/")
HELM_VALUES_FILES = {KIND_VALUES, MONITORING_VALUES}
# CRD-based kinds whose CRDs ship with the Prometheus operator, not with us.
MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}
POD_SECURITY_WARNING = "would violate PodSecurity"


# --------------------------------------------------------------------------- helpers
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def _api_object_files() -> list[Path]:
    out = []
    for path in _yaml_files():
        if path in HELM_VALUES_FILES:
            continue
        docs = _docs(path)
        if all(str(d.get("apiVersion", "")).startswith(CONFIG_API_GROUPS) for d in docs):
            continue
        out.append(path)
    return out


def _helm_template(*values: Path, namespace: str = "kubetrain") -> list[dict]:
    helm = tool("KUBETRAIN_HELM", "helm")
    args = [helm, "template", "quickstart", str(CHART), "-n", namespace]
    for v in values:
        args += ["-f", str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _selects(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against labels.
    An empty selector selects everything; a missing (null) one nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _namespace_doc() -> dict:
    (doc,) = _docs(K8S / "namespace.yaml")
    return doc


def _dry_run_file(apiserver, path: Path, namespace: str) -> subprocess.CompletedProcess:
    docs = _docs(path)
    ns_args = [] if all(d["kind"] == "Namespace" for d in docs) else ["-n", namespace]
    return apiserver.kubectl("apply", "--server-side", "--dry-run=server",
                             "--field-manager=kubetrain-tests", "-f", str(path), *ns_args,
                             check=False)


def _label_like_experiment_namespace(apiserver, namespace: str) -> None:
    labels = [f"{k}={v}" for k, v in _namespace_doc()["metadata"]["labels"].items()]
    apiserver.kubectl("label", "namespace", namespace, "--overwrite", *labels)


# --------------------------------------------------------------------------- static checks
def test_every_yaml_under_k8s_is_an_api_object_or_known_config():
    files = _yaml_files()
    assert files, "no manifests under k8s/"
    api = set(_api_object_files())
    for path in files:
        for doc in _docs(path):
            if path in api:
                assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), \
                    f"{path.relative_to(REPO)}: not a Kubernetes object"
                # Namespaced objects take the namespace from kustomize or -n, so the
                # same files serve any namespace (and the dry runs below).
                assert "namespace" not in doc["metadata"], f"{path.relative_to(REPO)} hardcodes a namespace"
            elif path not in HELM_VALUES_FILES:
                assert str(doc.get("apiVersion", "")).startswith(CONFIG_API_GROUPS), path


def test_kustomization_lists_every_dev_stack_manifest():
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    listed = {(K8S / r).resolve() for r in kustomization["resources"]}
    expected = {p.resolve() for p in _api_object_files()}
    assert listed == expected, f"k8s/kustomization.yaml resources differ: {sorted(map(str, listed ^ expected))}"
    assert kustomization["namespace"] == _namespace_doc()["metadata"]["name"]


def test_images_are_pinned():
    images = [(path, line.split("image:", 1)[1].strip())
              for path in _yaml_files() for line in path.read_text().splitlines()
              if re.match(r"\s*(- )?image:\s*\S", line)]
    assert images
    for path, image in images:
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), \
            f"{path.relative_to(REPO)}: image {image} is not pinned to a version tag"
    ref = _docs(K8S / "training-operator" / "kustomization.yaml")[0]["resources"][0]
    assert re.search(r"\?ref=v\d+\.\d+\.\d+$", ref), ref


def test_dev_credentials_endpoint_and_bucket_agree():
    secret = _docs(K8S / "s3-credentials.example.yaml")[0]
    s3_config = json.loads(_docs(K8S / "seaweedfs" / "s3-config.yaml")[0]["stringData"]["s3.json"])
    keys = {(c["accessKey"], c["secretKey"]) for ident in s3_config["identities"]
            for c in ident["credentials"]}
    creds = secret["stringData"]
    assert (creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"]) in keys

    values = yaml.safe_load(KIND_VALUES.read_text())
    assert values["s3"]["credentialsSecret"] == secret["metadata"]["name"]
    service = _docs(K8S / "seaweedfs" / "service.yaml")[0]
    s3_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "s3")
    namespace = _namespace_doc()["metadata"]["name"]
    assert values["s3"]["endpoint"] == f"http://{service['metadata']['name']}.{namespace}.svc:{s3_port}"

    job = _docs(K8S / "seaweedfs" / "bucket-job.yaml")[0]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert values["checkpoint"]["uri"].startswith(f"s3://{env['BUCKET']}/")


def test_dev_values_pass_the_chart_schema():
    result = run_cli("render", "quickstart", "-f", str(QUICKSTART), "-f", str(KIND_VALUES))
    assert result.returncode == 0, result.stderr
    assert "kind: PyTorchJob" in result.stdout


def test_monitoring_stack_selects_the_charts_podmonitor_rules_and_dashboard():
    objects = _helm_template(QUICKSTART, KIND_VALUES)
    by_kind = {d["kind"]: d for d in objects}
    assert MONITORING_KINDS <= set(by_kind), "values-kind.yaml must enable the PodMonitor and PrometheusRule"
    ns = _namespace_doc()["metadata"]
    ns_labels = {**ns["labels"], "kubernetes.io/metadata.name": ns["name"]}

    spec = yaml.safe_load(MONITORING_VALUES.read_text())["prometheus"]["prometheusSpec"]
    for kind, sel, ns_sel, nil_uses_helm in (
        ("PodMonitor", "podMonitorSelector", "podMonitorNamespaceSelector", "podMonitorSelectorNilUsesHelmValues"),
        ("PrometheusRule", "ruleSelector", "ruleNamespaceSelector", "ruleSelectorNilUsesHelmValues"),
    ):
        # With NilUsesHelmValues (the chart default) an empty selector becomes `release: <name>`.
        assert spec.get(nil_uses_helm) is False or spec.get(sel), f"{nil_uses_helm} must be false"
        assert _selects(spec.get(sel), by_kind[kind]["metadata"]["labels"]), f"{sel} misses the chart's {kind}"
        assert _selects(spec.get(ns_sel), ns_labels), f"{ns_sel} misses namespace {ns['name']}"

    dashboards = yaml.safe_load(MONITORING_VALUES.read_text())["grafana"]["sidecar"]["dashboards"]
    dashboard_cm = next(d for d in objects if d["kind"] == "ConfigMap"
                        and "grafana_dashboard" in d["metadata"].get("labels", {}))
    assert dashboards["enabled"] is True
    assert dashboard_cm["metadata"]["labels"][dashboards["label"]] == dashboards["labelValue"]
    search = dashboards.get("searchNamespace", "")
    assert search == "ALL" or ns["name"] in (search if isinstance(search, list) else str(search).split(","))


# --------------------------------------------------------------------------- against the API server
@pytest.mark.parametrize("path", _api_object_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_passes_server_side_dry_run(apiserver, namespace, path):
    _label_like_experiment_namespace(apiserver, namespace)
    result = _dry_run_file(apiserver, path, namespace)
    assert result.returncode == 0, f"{path.relative_to(REPO)}:\n{result.stderr}"
    assert "(server dry run)" in result.stdout
    assert POD_SECURITY_WARNING not in result.stderr, result.stderr


def test_pod_security_is_enforced_in_the_experiment_namespace(apiserver, namespace):
    """The restricted profile in namespace.yaml is real: a root pod is refused."""
    _label_like_experiment_namespace(apiserver, namespace)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-pod"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    result = apiserver.apply(pod, namespace=namespace, dry_run=True, check=False)
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr and "restricted" in result.stderr, result.stderr


def test_chart_on_dev_stack_values_passes_dry_run(apiserver, namespace):
    """What the walk-through installs: built-in kinds and the PyTorchJob (against
    its CRD) are accepted in a restricted namespace; PodMonitor/PrometheusRule
    only where their CRDs are installed."""
    _label_like_experiment_namespace(apiserver, namespace)
    objects = _helm_template(QUICKSTART, KIND_VALUES, namespace=namespace)
    crds = apiserver.kubectl("get", "crd", "-o", "name").stdout
    skipped = []
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS and "monitoring.coreos.com" not in crds:
            skipped.append(obj["kind"])
            continue
        result = apiserver.apply(obj, namespace=namespace, dry_run=True, check=False)
        assert result.returncode == 0, f"{obj['kind']}/{obj['metadata']['name']}:\n{result.stderr}"
        assert POD_SECURITY_WARNING not in result.stderr, result.stderr
    assert "PyTorchJob" in {o["kind"] for o in objects}
    if skipped:
        print(f"not validated (monitoring.coreos.com CRDs not installed): {', '.join(sorted(skipped))}")


def _training_operator_manifests(ref: str) -> Path | None:
    """The upstream manifests of the pinned release, from a local copy of the Go module."""
    env = os.environ.get("KUBETRAIN_TRAINING_OPERATOR_MANIFESTS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("KUBETRAIN_CACHE", Path.home() / ".cache" / "kubetrain"))
    found = glob.glob(str(cache / "go" / "pkg" / "mod" / "github.com" / "kubeflow"
                          / f"training-operator@{ref}" / "manifests"))
    return Path(found[0]) if found else None


def test_training_operator_kustomization_dry_runs(apiserver, tmp_path):
    kustomization = _docs(K8S / "training-operator" / "kustomization.yaml")[0]
    (remote,) = kustomization["resources"]
    path_in_repo, ref = re.fullmatch(r"github\.com/kubeflow/training-operator\.git/(.+)\?ref=(v[\d.]+)",
                                     remote).groups()
    manifests = _training_operator_manifests(ref)
    if manifests is None or not manifests.is_dir():
        pytest.skip(f"no local copy of github.com/kubeflow/training-operator@{ref} manifests "
                    "(set KUBETRAIN_TRAINING_OPERATOR_MANIFESTS); no network to fetch the remote base")
    # Our kustomization with the remote base swapped for the same release's local copy.
    # (kustomize refuses absolute paths: a copy beside it, referenced relatively.)
    shutil.copytree(manifests, tmp_path / "upstream" / "manifests")
    ours = tmp_path / "ours"
    ours.mkdir()
    local = dict(kustomization, resources=[str(Path("..") / "upstream" / path_in_repo)])
    (ours / "kustomization.yaml").write_text(yaml.safe_dump(local))
    shutil.copy(K8S / "training-operator" / "init-container.tmpl", ours)
    built = apiserver.kubectl("kustomize", str(ours)).stdout
    objects = [d for d in yaml.safe_load_all(built) if d]
    kinds = {d["kind"] for d in objects}
    assert {"CustomResourceDefinition", "Deployment", "Namespace", "ClusterRole"} <= kinds, kinds
    deployment = next(d for d in objects if d["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.search(r":v1-[0-9a-f]+$", image), f"operator image not pinned: {image}"
    # Our Worker init container template (Pod Security `restricted`) reaches the operator.
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--pytorch-init-container-template-file=/etc/kubetrain/init-container.tmpl" in container["args"]
    template = next(d for d in objects if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"].startswith("training-operator-pytorch-init-container"))
    assert "runAsNonRoot: true" in template["data"]["init-container.tmpl"]

    # Its PyTorchJob CRD is the one the cluster tier already serves (same release);
    # the CRDs are left out of the dry run, which costs seconds per CRD.
    crd = next(d for d in objects if d["kind"] == "CustomResourceDefinition"
               and d["metadata"]["name"] == "pytorchjobs.kubeflow.org")
    assert crd["spec"] == yaml.safe_load(apiserver.crd_path.read_text())["spec"]
    checked = [d for d in objects if d["kind"] != "CustomResourceDefinition"]
    # The namespace must exist for a dry run of the objects in it.
    apiserver.kubectl("create", "namespace", "kubeflow", check=False)
    result = apiserver.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server",
                               "--field-manager=kubetrain-tests", "-f", "-",
                               input=yaml.safe_dump_all(checked), check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/training-operator serverside-applied (server dry run)" in result.stdout
    assert "validatingwebhookconfiguration.admissionregistration.k8s.io/validator.training-operator.kubeflow.org" \
        in result.stdout, result.stdout


def test_seaweedfs_capacity_fits_its_volume_whatever_the_free_disk():
    """A fixed count of volumes (not -volume.max=0, which sizes from free disk) whose full size fits
    the PVC, and a master.toml mounted that grows one volume per new bucket."""
    deployment = _docs(K8S / "seaweedfs" / "deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in container["args"] if "=" in arg)
    volumes, size_mb = int(flags["volume.max"]), int(flags["master.volumeSizeLimitMB"])
    pvc = _docs(K8S / "seaweedfs" / "pvc.yaml")[0]
    gib = int(pvc["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
    assert 0 < volumes * size_mb <= gib * 1024 * 0.9, (volumes, size_mb, gib)
    assert flags["master.volumePreallocate"] == "false"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/seaweedfs/master.toml"]["subPath"] == "master.toml"
    toml = _docs(K8S / "seaweedfs" / "master-config.yaml")[0]["data"]["master.toml"]
    assert "copy_1 = 1" in toml
