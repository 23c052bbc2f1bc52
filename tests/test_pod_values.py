"""Pod-level values are held to Kubernetes' rules before anything runs or is applied (#32 item 1).

Every case goes through `kubetrain render` and `kubetrain run` (the CLI as a process) and the real
`helm template`: a mistake is refused by each, naming its key, and `run` leaves nothing on disk; the
values that are valid Kubernetes stay accepted. The schema half (Kubernetes' OpenAPI types plus the
rules OpenAPI cannot say) serves all paths from values.schema.json; the rules that span keys live in
the chart's `kubetrain.validatePod` and trainer/controller/checks.py, and each such case runs through
both. tests/cluster/test_pod_values_server.py sends the same cases to a real API server.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from support import REPO, run_cli
from trainer.controller.checks import CHART_MOUNTS, chart_env_names
from trainer.controller.helm import manifests
from trainer.values import resolve_values

CHART = REPO / "helm" / "kubetrain"
HELM = os.environ.get("KUBETRAIN_HELM") or shutil.which("helm")
needs_helm = pytest.mark.skipif(not HELM, reason="helm not found: run `eval \"$(scripts/install-test-tools.sh)\"`")

GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PVC = {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}
EMPTY = {"name": "scratch", "emptyDir": {}}
FIELD = {"fieldRef": {"fieldPath": "metadata.name"}}
TERM = {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}

# (id, values, the key the refusal names). Schema refusals name keys as `a.0.b`, the chart's own as `a[0].b`.
REFUSED = [
    ("toleration-operator-Equals", {"tolerations": [{"key": "a", "operator": "Equals", "value": "b"}]},
     "tolerations.0.operator"),
    ("toleration-effect-NoScheduled", {"tolerations": [{**GPU, "effect": "NoScheduled"}]}, "tolerations.0.effect"),
    ("toleration-Exists-with-value", {"tolerations": [{**GPU, "value": "yes"}]}, "tolerations.0.value"),
    ("toleration-no-key-Equal", {"tolerations": [{"operator": "Equal", "value": "b"}]}, "tolerations.0.operator"),
    ("toleration-seconds-NoSchedule", {"tolerations": [{**GPU, "tolerationSeconds": 60}]}, "tolerations.0.effect"),
    ("toleration-unknown-field", {"tolerations": [{**GPU, "tolerate": True}]}, "tolerations.0"),
    ("toleration-key-space", {"tolerations": [{"key": "a b", "operator": "Exists"}]}, "tolerations.0.key"),
    ("toleration-seconds-text", {"tolerations": [{**GPU, "effect": "NoExecute", "tolerationSeconds": "60"}]},
     "tolerations.0.tolerationSeconds"),
    ("label-value-64-chars", {"podLabels": {"team": "x" * 64}}, "podLabels.team"),
    ("label-key-space", {"podLabels": {"my team": "ml"}}, "podLabels"),
    ("label-value-slash", {"podLabels": {"team": "ml/vision"}}, "podLabels.team"),
    ("label-key-two-slashes", {"podLabels": {"a/b/c": "x"}}, "podLabels"),
    ("label-key-uppercase-prefix", {"podLabels": {"Example.com/team": "ml"}}, "podLabels"),
    ("annotation-key-space", {"podAnnotations": {"my note": "x"}}, "podAnnotations"),
    ("node-selector-value-space", {"nodeSelector": {"disk": "fast ssd"}}, "nodeSelector.disk"),
    ("env-value-and-valueFrom", {"env": [{"name": "A", "value": "1", "valueFrom": FIELD}]}, "env.0"),
    ("env-valueFrom-two-sources", {"env": [{"name": "A", "valueFrom": {
        **FIELD, "secretKeyRef": {"name": "s", "key": "k"}}}]}, "env.0.valueFrom"),
    ("env-valueFrom-empty", {"env": [{"name": "A", "valueFrom": {}}]}, "env.0.valueFrom"),
    ("env-unknown-field", {"env": [{"name": "A", "val": "1"}]}, "env.0"),
    ("env-name-leading-digit", {"env": [{"name": "1A", "value": "1"}]}, "env.0.name"),
    ("env-HOME-replaces-the-charts", {"env": [{"name": "HOME", "value": "/home/me"}]}, "env[0].name"),
    ("env-repeats-ncclEnv", {"ncclEnv": {"NCCL_DEBUG": "INFO"}, "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
     "env[0].name"),
    ("env-repeats-s3-key", {"s3": {"credentialsSecret": "keys"}, "env": [{"name": "AWS_ACCESS_KEY_ID", "value": "a"}]},
     "env[0].name"),
    ("volume-two-sources", {"volumes": [{**PVC, "emptyDir": {}}]}, "volumes.0"),
    ("volume-no-source", {"volumes": [{"name": "data"}]}, "volumes.0"),
    ("volume-name-uppercase", {"volumes": [{**EMPTY, "name": "Scratch"}]}, "volumes.0.name"),
    ("volume-named-tmp", {"volumes": [{**EMPTY, "name": "tmp"}]}, "volumes[0].name"),
    ("volume-named-config", {"volumes": [{**EMPTY, "name": "config"}]}, "volumes[0].name"),
    ("volume-named-dshm", {"volumes": [{**EMPTY, "name": "dshm"}]}, "volumes[0].name"),
    ("volume-name-twice", {"volumes": [PVC, {**EMPTY, "name": "data"}]}, "volumes[1].name"),
    ("volume-source-typo", {"volumes": [{"name": "data", "persistentVolumeClaim": {"claim": "datasets"}}]},
     "volumes.0.persistentVolumeClaim"),
    ("mount-of-no-volume", {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}, "volumeMounts[0].name"),
    ("mount-at-tmp", {"volumes": [EMPTY], "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]},
     "volumeMounts[0].mountPath"),
    ("mount-at-dev-shm", {"volumes": [EMPTY], "volumeMounts": [{"name": "scratch", "mountPath": "/dev/shm/"}]},
     "volumeMounts[0].mountPath"),
    ("mount-at-etc-kubetrain", {"volumes": [PVC], "volumeMounts": [{"name": "data", "mountPath": "/etc/kubetrain"}]},
     "volumeMounts[0].mountPath"),
    ("mount-path-twice", {"volumes": [PVC, EMPTY], "volumeMounts": [{"name": "data", "mountPath": "/d"},
                                                                    {"name": "scratch", "mountPath": "/d"}]},
     "volumeMounts[1].mountPath"),
    ("mount-without-path", {"volumes": [PVC], "volumeMounts": [{"name": "data"}]}, "volumeMounts.0"),
    ("mount-readOnly-text", {"volumes": [PVC], "volumeMounts": [{"name": "data", "mountPath": "/d", "readOnly": "yes"}]},
     "volumeMounts.0.readOnly"),
    ("affinity-typo", {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {"nodeSelectorTerms": [TERM]}}}},
     "affinity.nodeAffinity"),
    ("affinity-operator-In-typo", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Inn", "values": ["a"]}]}]}}}},
     "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.0.matchExpressions.0"
     ".operator"),
    ("pod-affinity-without-topologyKey", {"affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"a": "b"}}}]}}},
     "affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.0"),
    ("image-repository-capitals", {"image": {"repository": "Kubetrain/Trainer"}}, "image.repository"),
    ("image-tag-with-colon", {"image": {"tag": "v1:2"}}, "image.tag"),
    ("image-repository-with-tag", {"image": {"repository": "kubetrain/trainer:0.1.0"}}, "image.repository"),
    ("image-repository-with-digest", {"image": {"repository": "kubetrain/trainer@sha256:" + "a" * 64}},
     "image.repository"),
]

ACCEPTED = [
    ("env-name-with-dash", {"env": [{"name": "MY-VAR", "value": "1"}, {"name": "B", "value": "", "valueFrom": FIELD}]}),
    ("cpu-zero", {"resources": {"cpu": "0"}}),
    ("tolerate-everything", {"tolerations": [{"operator": "Exists"}, GPU,
                                             {"key": "k", "operator": "Exists", "effect": "NoExecute",
                                              "tolerationSeconds": 30}, {"key": "k", "value": "v"},
                                             {"key": "k", "operator": "", "effect": ""}]}),
    ("labels-prefixed-and-empty", {"podLabels": {"example.com/team": "ml", "tier": "", "v": "1.2_3-a"},
                                   "nodeSelector": {"kubernetes.io/arch": "amd64"},
                                   "podAnnotations": {"example.com/note": "any text: at all / ok"}}),
    ("volumes-and-mounts", {"volumes": [PVC, EMPTY], "volumeMounts": [
        {"name": "data", "mountPath": "/data", "readOnly": True}, {"name": "scratch", "mountPath": "/tmp/x"},
        {"name": "tmp", "mountPath": "/scratch"}]}),
    ("affinity", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [TERM]}}, "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"app": "x"}}}}]}}}),
    ("image-registry-port", {"image": {"repository": "localhost:5000/team/kubetrain", "tag": "v1.2_3"}}),
    ("image-registry-host", {"image": {"repository": "registry.example.com:443/ml/trainer", "tag": "sha-abc"}}),
]


def _write(tmp_path, values: dict):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm_template(path) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, "template", "pod-values", str(CHART), "-f", str(path)], capture_output=True,
                          text=True, timeout=120)


def assert_refused(result, key: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    assert any(line.lstrip("- ").startswith(key + ":") or f"{key}:" in line for line in result.stderr.splitlines()), \
        f"{key} not named in:\n{result.stderr}"


@needs_helm
@pytest.mark.parametrize("values,key", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_by_render_run_and_helm(values, key, tmp_path):
    path = _write(tmp_path, values)
    assert_refused(run_cli("render", "pod-values", "-f", str(path)), key)
    workdir = tmp_path / "run"
    assert_refused(run_cli("run", "pod-values", "--workdir", str(workdir), "-f", str(path)), key)
    assert not workdir.exists() or not any(workdir.iterdir()), "run left files behind"
    theirs = helm_template(path)
    assert theirs.returncode != 0 and key in theirs.stderr, theirs.stderr


@needs_helm
@pytest.mark.parametrize("values", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_valid_kubernetes_stays_accepted(values, tmp_path):
    path = _write(tmp_path, values)
    ours = run_cli("render", "pod-values", "-f", str(path))
    assert ours.returncode == 0, ours.stderr
    assert helm_template(path).returncode == 0


def test_the_cases_cover_the_issue():
    """#32 listed 44 plausible mistakes and valid values that must stay accepted."""
    assert len(REFUSED) >= 44 and len(ACCEPTED) >= 2
    assert len({c[0] for c in REFUSED + ACCEPTED}) == len(REFUSED) + len(ACCEPTED)


@needs_helm
@pytest.mark.parametrize("sets", [[], ["s3.credentialsSecret=keys", "ncclEnv.NCCL_DEBUG=INFO"],
                                  ["s3.devSecret.enabled=true,s3.devSecret.accessKeyId=a,"
                                   "s3.devSecret.secretAccessKey=b", "job.kind=TrainJob"]])
def test_the_reserved_names_are_what_the_chart_renders(sets):
    """checks.py's CHART_MOUNTS and chart_env_names are the volumes, mounts and env helm renders."""
    args = ["template", "reserved", str(CHART)] + [a for s in sets for a in ("--set", s)]
    stream = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=True).stdout
    job = next(o for o in manifests(stream) if o["kind"] in ("PyTorchJob", "TrainJob"))
    if job["kind"] == "TrainJob":
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        env = job["spec"]["trainer"]["env"]
    else:
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        env = pod["containers"][0]["env"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert [v["name"] for v in pod["volumes"]] == list(CHART_MOUNTS) and mounts == CHART_MOUNTS
    values = resolve_values(set_values=sets)
    assert [e["name"] for e in env] == chart_env_names(values)
