"""What ties `kubetrain run` (no helm) to the cluster: the chart, rendered by the real helm.

The chart is the one renderer of every manifest. `kubetrain run` keeps only what it
shares with the pods: the values model and merging (trainer/values.py), the chart's
refusals (trainer/controller/checks.py), the trainer config (trainer/config.py) and the
replica command. For every example and a generated sweep of values, helm's ConfigMap
`config.json` must equal (as JSON) the config `kubetrain run` hands its replicas, and the
PyTorchJob's or TrainJob's container command and plain env must equal what the local
replicas get, minus the addresses the operator injects. Values either side refuses, the
other refuses too, naming the same keys or saying the same message.

Uses the real helm binary (KUBETRAIN_HELM or PATH; scripts/install-test-tools.sh
provides it) and skips visibly without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from support import EXAMPLES, REPO, run_cli
from trainer.config import trainer_config_document
from trainer.controller.checks import CONFIG_PATH, check_values, container_env, trainer_command
from trainer.controller.helm import manifests
from trainer.errors import UserError
from trainer.values import resolve_values

CHART = REPO / "helm" / "kubetrain"
HELM = os.environ.get("KUBETRAIN_HELM") or shutil.which("helm")
pytestmark = pytest.mark.skipif(
    not HELM, reason="helm not found: set KUBETRAIN_HELM or run `eval \"$(scripts/install-test-tools.sh)\"`")


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def helm_template(name: str, files: list[Path] = (), sets: list[str] = ()) -> subprocess.CompletedProcess:
    args = ["template", name, str(CHART)]
    for path in files:
        args += ["-f", str(path)]
    for expr in sets:
        args += ["--set", expr]
    return helm(*args)


def schema_paths(stderr: str) -> set[str]:
    """Key paths from helm's or our `- path: message` schema report (without helm's extra lines that
    only say an if/then or allOf around the real violation failed)."""
    return {m.group(1) for m in re.finditer(r"^- ([^:\s]+): (?!Must validate)", stderr, re.M)}


def assert_tied(name: str, values: dict, stream: str, context: str = "") -> None:
    """helm's objects carry what `kubetrain run` gives its replicas (values: as trainer/values.py merged them)."""
    objects = {(obj["kind"], obj["metadata"]["name"]): obj for obj in manifests(stream)}
    config = json.loads(objects[("ConfigMap", f"{name}-config")]["data"]["config.json"])
    assert config == trainer_config_document(name, values), f"config.json differs{context}"
    job_values = values["job"]
    if job_values["kind"] == "TrainJob":
        job = objects[("TrainJob", name)]["spec"]
        containers = [job["trainer"]]
        assert (job["trainer"]["numNodes"], job["trainer"]["numProcPerNode"]) == \
            (job_values["nodes"], job_values["nprocPerNode"]), context
    else:
        job = objects[("PyTorchJob", name)]["spec"]
        replicas = job["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) == job_values["nodes"], context
        assert int(job["nprocPerNode"]) == job_values["nprocPerNode"], context
        containers = [r["template"]["spec"]["containers"][0] for r in replicas.values()]
    for container in containers:
        assert container["command"] == trainer_command(values, CONFIG_PATH, python="python"), context
        env = container.get("env") or []
        plain = {e["name"]: e["value"] for e in env if "value" in e and e["name"] != "HOME"}
        assert plain == container_env(values), f"container env differs{context}"
        secret = {e["name"] for e in env if "valueFrom" in e}
        assert secret <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, context


# ---------------------------------------------------------------- examples, via the real CLI
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_ties_run_to_helms_manifests(example):
    name, files = example.stem.replace("_", "-"), [example]
    args = [a for f in files for a in ("-f", str(f))]
    ours = run_cli("render", name, *args)
    assert ours.returncode == 0, ours.stderr
    theirs = helm_template(name, files)
    assert theirs.returncode == 0 and ours.stdout == theirs.stdout, theirs.stderr
    assert_tied(name, resolve_values(files), ours.stdout)


def test_helm_lint_strict_is_clean():
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


# ---------------------------------------------------------------- schema failures
BAD_VALUES = [
    ["job.nodes=0"],
    ["job.nprocPerNode=auto"],
    ["image.bogus=1"],
    ["bogus=1"],
    ["training.optimizer.lr=0"],
    ["training.pretrained=ftp://weights"],
    ["checkpoint.resume=-1"],
    ["resources.gpu=-1"],
    ["metrics.port=70000"],
    ["job.cleanPodPolicy=Sometimes"],
    ["job.ttlSecondsAfterFinished=-5"],
    ["job.elastic.minNodes=0"],
    ["job.schedulingPolicy.minAvailable=x"],
    ["ncclEnv.FOO=1"],
    ["env[0].value=x"],
    ["podLabels.team=1"],
    ["metrics.podMonitor.interval=15"],
    ["shm.sizeLimit=lots"],
    ["kueue.queueName=Team_Queue"],
    ["s3.devSecret.enabled=yes"],
    # What the API server would refuse after the first objects were applied: half an experiment.
    ["resources.cpu=lots"],
    ["resources.cpu=two-cores"],
    ["resources.cpu=-1"],
    ["resources.memory=-1Gi"],
    ["checkpoint.uri=s3:///prefix"],
    ["job.nodes=2.5"],
    # The task rules: what a task cannot run is refused before anything starts.
    ["training.task=nope"],
    ["training.task=bert-sentiment,training.numClasses=3"],
    ["training.task=cifar10-convnet,training.data.source=imagenet"],
    ["training.task=custom"],
    ["training.task=speech-conv1d,training.data.source=folder"],
    ["training.data.source=cifar10,training.numClasses=5"],
    ["serviceAccount.create=1", "job.restartPolicy=Sometimes", "training.batchSize=0"],
]


@pytest.mark.parametrize("sets", BAD_VALUES, ids=lambda s: ",".join(s))
def test_schema_failures_name_the_same_keys(sets):
    theirs = helm_template("bad-values", sets=sets)
    assert theirs.returncode != 0
    ours = run_cli("render", "bad-values", *[a for s in sets for a in ("--set", s)])
    assert ours.returncode == 2, ours.stderr
    assert "Traceback" not in ours.stderr and ours.stdout == ""
    assert schema_paths(ours.stderr) == schema_paths(theirs.stderr) != set(), (ours.stderr, theirs.stderr)


CHART_FAILURES = [
    ("9lives", []),
    ("dotted.name", []),
    ("a" * 53, ["job.nodes=102"]),
    ("elastic", ["job.elastic.enabled=true,job.elastic.minNodes=3,job.nodes=2"]),
    ("elastic", ["job.elastic.enabled=true,job.elastic.maxNodes=2,job.nodes=4"]),
    ("ports", ["metrics.port=65535,job.nprocPerNode=2"]),
    ("ports", ["job.masterPort=9401,job.nprocPerNode=2"]),
    ("secrets", ["s3.devSecret.enabled=true,s3.credentialsSecret=s3-keys"]),
    ("secrets", ["s3.devSecret.enabled=true"]),
    # What only the v1 PyTorchJob has, refused for a Trainer v2 TrainJob.
    ("v2", ["job.kind=TrainJob,job.elastic.enabled=true"]),
    ("v2", ["job.kind=TrainJob,job.schedulingPolicy.queue=research"]),
    ("v2", ["job.kind=TrainJob,job.ttlSecondsAfterFinished=60"]),
    ("v2", ["job.kind=TrainJob,job.runtime=torch-distributed,schedulerName=volcano"]),
    # What a TrainJob cannot carry, or its named ClusterTrainingRuntime sets instead.
    ("v2", ["job.kind=TrainJob,job.restartPolicy=Always"]),
    ("v2", ["job.kind=TrainJob,job.cleanPodPolicy=Running"]),
    ("v2", ["job.kind=TrainJob,job.masterPort=9400"]),
    ("v2", ["job.kind=TrainJob,metrics.port=29500"]),
    ("v2", ["job.kind=TrainJob,metrics.port=29497,job.nprocPerNode=4"]),
    ("v2", ["job.kind=TrainJob,job.runtime=torch-distributed,image.pullPolicy=Always"]),
    ("v2", ["job.kind=TrainJob,job.runtime=torch-distributed,job.restartPolicy=Never"]),
    ("v2", ["job.kind=TrainJob,job.runtime=torch-distributed,job.backoffLimit=0"]),
    ("v2", ["job.kind=TrainJob,env[0].name=PET_NNODES,env[0].value=three"]),
    # The user's volumes, mounts and env against the pod's own (more in tests/test_pod_values.py).
    ("pod", ["volumes[0].name=tmp,volumes[0].emptyDir.medium=Memory"]),
    ("pod", ["volumes[0].name=d,volumes[0].emptyDir.medium=Memory,volumes[1].name=d,volumes[1].emptyDir.medium="]),
    ("pod", ["volumeMounts[0].name=data,volumeMounts[0].mountPath=/data"]),
    ("pod", ["volumeMounts[0].name=tmp,volumeMounts[0].mountPath=/etc/kubetrain/"]),
    ("pod", ["volumeMounts[0].name=tmp,volumeMounts[0].mountPath=/a,volumeMounts[1].name=dshm,volumeMounts[1].mountPath=/a"]),
    ("pod", ["env[0].name=HOME,env[0].value=/home/me"]),
]


@pytest.mark.parametrize("name,sets", CHART_FAILURES, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_chart_checks_fail_with_the_same_message(name, sets):
    theirs = helm_template(name, sets=sets)
    assert theirs.returncode != 0
    ours = run_cli("render", name, *[a for s in sets for a in ("--set", s)])
    assert ours.returncode == 2 and ours.stdout == "", ours.stderr
    message = ours.stderr.strip().removeprefix("Error: ")
    assert "\n" not in message and "Traceback" not in ours.stderr
    assert message in theirs.stderr, (message, theirs.stderr)


@pytest.mark.parametrize("name", ["a" * 54, "ends-with-dash-", "Upper"])
def test_names_helm_refuses_are_refused_too(name):
    assert helm_template(name).returncode != 0
    ours = run_cli("render", name)
    assert ours.returncode == 2 and ours.stdout == "" and f'experiment name "{name}"' in ours.stderr


# ---------------------------------------------------------------- generated values
ODD_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn", "Cf", "Zl", "Zp")),
        st.sampled_from("\n\t \"'\\:#{}[]&*!|>%@`,=-?~"),
    ),
    max_size=16,
)
LABEL_MAP = st.dictionaries(st.from_regex(r"[a-z][a-z0-9./-]{0,12}[a-z0-9]", fullmatch=True), ODD_TEXT, max_size=3)
# A pod's labels, node selector and annotations: Kubernetes' key syntax (and label values), which the schema
# enforces; odd text too, which both paths refuse alike.
POD_KEY = st.from_regex(r"([a-z0-9]{1,5}\.[a-z]{2,3}/)?[a-z][a-z0-9._-]{0,10}[a-z0-9]", fullmatch=True)
POD_LABELS = st.dictionaries(POD_KEY, st.one_of(
    st.from_regex(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?)?", fullmatch=True), ODD_TEXT), max_size=3)
POD_ANNOTATIONS = st.dictionaries(POD_KEY, ODD_TEXT, max_size=3)
NAME = st.one_of(
    st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
    st.integers(40, 53).map(lambda n: ("long-" + "x" * 60)[:n - 1] + "z"),
)


@st.composite
def values_sets(draw) -> tuple[str, dict]:
    nodes = draw(st.one_of(st.integers(1, 12), st.integers(90, 130)))
    nproc = draw(st.integers(1, 8))
    elastic = draw(st.booleans())
    job: dict = {"nodes": nodes, "nprocPerNode": nproc,
                 "restartPolicy": draw(st.sampled_from(["ExitCode", "OnFailure", "Never", "Always"])),
                 "backoffLimit": draw(st.integers(0, 10)),
                 "cleanPodPolicy": draw(st.sampled_from(["None", "Running", "All"])),
                 "suspend": draw(st.booleans()),
                 "ttlSecondsAfterFinished": draw(st.one_of(st.none(), st.integers(0, 10**6))),
                 "activeDeadlineSeconds": draw(st.one_of(st.none(), st.integers(1, 10**7))),
                 "schedulingPolicy": {"queue": draw(st.sampled_from(["", "research"])),
                                      "priorityClass": draw(st.sampled_from(["", "high"])),
                                      "minAvailable": draw(st.integers(0, 4))},
                 "elastic": {"enabled": elastic, "minNodes": draw(st.integers(1, 4)),
                             "maxNodes": draw(st.sampled_from([0, nodes, nodes + 3, max(1, nodes - 1)])),
                             "maxRestarts": draw(st.integers(0, 5))}}
    values: dict = {
        "image": {"repository": draw(st.one_of(st.sampled_from(["kubetrain/trainer", "ghcr.io/org/trainer",
                                                                 "localhost:5000/kt"]), ODD_TEXT.map("x".__add__))),
                  "tag": draw(st.one_of(st.sampled_from(["", "v1", "0.1.0-rc_1"]), ODD_TEXT)),
                  "pullSecrets": draw(st.lists(st.sampled_from(["regcred", "mirror"]), max_size=2, unique=True))},
        "job": job,
        "training": {"data": {"root": draw(ODD_TEXT)}, "seed": draw(st.integers(0, 2**31)),
                     "optimizer": {"lr": draw(st.floats(1e-7, 1.0)),
                                   "weightDecay": draw(st.sampled_from([0, 0.0, 1.0, 1e-7, 0.25, 1234567.5]))},
                     "gradClipNorm": draw(st.sampled_from([1.0, 0, 2, 0.5, 1e21, 3.0e-7])),
                     "options": draw(st.dictionaries(st.sampled_from(["a", "b-c", "dim"]),
                                                     st.one_of(ODD_TEXT, st.integers(-5, 10**9), st.booleans()),
                                                     max_size=3))},
        "s3": {"region": draw(ODD_TEXT), "endpoint": draw(st.sampled_from(["", "http://s3.local:9000"]))},
        "metrics": {"enabled": draw(st.booleans()), "port": draw(st.sampled_from([9400, 9090, 65530])),
                    "podMonitor": {"enabled": draw(st.booleans()), "labels": draw(LABEL_MAP)},
                    "prometheusRule": {"enabled": draw(st.booleans()), "labels": draw(LABEL_MAP)},
                    "dashboard": {"enabled": draw(st.booleans()), "labels": draw(LABEL_MAP)}},
        "resources": {"gpu": draw(st.integers(0, 8)),
                      "cpu": draw(st.sampled_from(["500m", 2, 0.5, "1.5", 16, 1000000, 0.000001])),
                      "memory": draw(st.sampled_from(["4Gi", 1073741824, "512Mi", 68719476736]))},
        "ncclEnv": draw(st.dictionaries(st.sampled_from(["NCCL_DEBUG", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME"]),
                                        st.one_of(ODD_TEXT, st.integers(0, 10**7), st.booleans()), max_size=3)),
        "env": draw(st.lists(st.builds(lambda i, v: {"name": f"EXTRA_{i}", "value": v}, st.integers(0, 9), ODD_TEXT),
                             max_size=2, unique_by=lambda e: e["name"])),
        "podAnnotations": draw(POD_ANNOTATIONS),
        "podLabels": draw(POD_LABELS),
        "nodeSelector": draw(POD_LABELS),
        "priorityClassName": draw(st.sampled_from(["", "training-high"])),
        "schedulerName": draw(st.sampled_from(["", "volcano"])),
        "kueue": {"queueName": draw(st.sampled_from(["", "team-a"]))},
        "terminationGracePeriodSeconds": draw(st.integers(0, 3600)),
        "shm": {"sizeLimit": draw(st.sampled_from(["", "1Gi", "64Mi"]))},
        "rbac": {"create": draw(st.booleans()),
                 "subjects": draw(st.lists(st.builds(lambda kind, who: {"kind": kind, "name": who},
                                                     st.sampled_from(["User", "Group"]), ODD_TEXT.filter(bool)),
                                           max_size=2))},
    }
    if draw(st.booleans()):
        values["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                 {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                  "effect": "NoExecute", "tolerationSeconds": draw(st.integers(0, 10**6))}]
        values["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "gpu", "operator": "In", "values": [draw(ODD_TEXT)]}]}]}}}
        values["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "cifar"}}]
        values["volumeMounts"] = [{"name": "data", "mountPath": "/data", "readOnly": True}]
    if draw(st.booleans()):
        values["podSecurityContext"] = None  # a null removes the chart's default
        values["securityContext"] = {}
    secret = draw(st.sampled_from(["none", "existing", "dev"]))
    if secret == "existing":
        values["s3"]["credentialsSecret"] = "s3-keys"
    elif secret == "dev":
        values["s3"]["devSecret"] = {"enabled": True, "accessKeyId": "x" + draw(ODD_TEXT),
                                     "secretAccessKey": "y" + draw(ODD_TEXT)}
    if draw(st.booleans()):
        values["serviceAccount"] = {"create": False, "name": draw(st.sampled_from(["", "trainer"]))}
    if draw(st.booleans()):  # a Trainer v2 TrainJob, mostly without the settings only a PyTorchJob has
        job.update(kind="TrainJob", runtime=draw(st.sampled_from(["", "torch-distributed", "torch.cuda-12"])))
        if draw(st.integers(0, 3)):
            job.update(ttlSecondsAfterFinished=None, schedulingPolicy={"queue": "", "priorityClass": "",
                                                                       "minAvailable": 0}, cleanPodPolicy="None")
            job["elastic"]["enabled"] = False
            if job["runtime"]:  # the named runtime sets these: values.yaml's defaults, which the chart repeats
                job.update(restartPolicy="ExitCode", backoffLimit=3)
                values.update(priorityClassName="", schedulerName="")
            elif job["restartPolicy"] == "Always":
                job["restartPolicy"] = "Never"
    return draw(NAME), values


def _tie_one(case: tuple[str, dict], path: Path) -> tuple[str, dict, subprocess.CompletedProcess, object]:
    """helm template of the values file, and what `kubetrain run` makes of it: its values or its refusal."""
    name, values = case
    path.write_text(yaml.safe_dump(values, allow_unicode=True))
    theirs = helm_template(name, [path])
    try:
        ours: object = resolve_values([path])
        check_values(name, ours)
    except UserError as e:
        ours = e
    return name, values, theirs, ours


# Hypothesis draws batches; each batch's helm calls run concurrently (helm's start-up dominates).
BATCH = 8


# No shrinking: a batch is slow to shrink, and each failure message carries its release name and values.
@settings(max_examples=26, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(values_sets(), min_size=BATCH, max_size=BATCH))
def test_generated_values_tie_run_to_helms_manifests(batch, tmp_path):
    paths = [tmp_path / f"values-{i}.yaml" for i in range(len(batch))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_tie_one, batch, paths))
    for name, values, theirs, ours in results:
        context = f"; release {name!r}, values:\n{yaml.safe_dump(values, allow_unicode=True)}"
        if isinstance(ours, Exception):
            assert theirs.returncode != 0, f"only kubetrain refused ({ours}){context}"
            if "schema" in str(ours):  # e.g. a bare `y` is a boolean to both (YAML 1.1)
                assert schema_paths(str(ours)) == schema_paths(theirs.stderr), f"{ours} vs {theirs.stderr}{context}"
            else:
                assert str(ours) in theirs.stderr, f"{ours} vs {theirs.stderr}{context}"
        else:
            assert theirs.returncode == 0, f"only helm refused: {theirs.stderr}{context}"
            assert_tied(name, ours, theirs.stdout, context)


@pytest.mark.parametrize("flags", [
    ["--set", "training.epochs=5", "--set-json", "training.epochs=7"],
    ["--set-json", "training.epochs=7", "--set", "training.epochs=5"],
    ["--set-string", "podLabels.team=a", "--set", "podLabels.team=b", "--set-json", 'podLabels.team="c"'],
    ["--set-json", 'training.optimizer={"lr": 0.01}', "--set", "training.optimizer.name=sgd"],
], ids=lambda f: " ".join(f))
def test_set_flags_apply_in_helms_order_whatever_the_command_line_order(flags):
    theirs = helm("template", "order", str(CHART), *flags)
    assert theirs.returncode == 0, theirs.stderr
    pick = {"--set": [], "--set-string": [], "--set-json": []}
    for flag, expr in zip(flags[::2], flags[1::2]):
        pick[flag].append(expr)
    values = resolve_values([], pick["--set"], pick["--set-string"], pick["--set-json"])
    assert_tied("order", values, theirs.stdout)
    [job] = [obj for obj in manifests(theirs.stdout) if obj["kind"] == "PyTorchJob"]
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert pod_labels.get("team") == (values.get("podLabels") or {}).get("team")


# ---------------------------------------------------------------- files, flags and nulls together
MERGE_CASES = {
    # a null in one file, a map in the next: Helm merges the map onto the chart default again
    "null-then-map": ([{"podSecurityContext": None}, {"podSecurityContext": {"runAsUser": 2000}}], [], True),
    "map-then-null": ([{"podSecurityContext": {"runAsUser": 2000}}, {"podSecurityContext": None}], [], True),
    # --set edits the list a file gave instead of replacing it
    "set-edits-a-file-list": ([{"tolerations": [{"key": "gpu", "operator": "Exists"}, {"key": "spot"}]}],
                              ["--set", "tolerations[0].effect=NoSchedule"], True),
    "every-flag": ([{"podLabels": {"team": "a"}}],
                   ["--set", "podLabels.owner=b", "--set-string", "podLabels.cost=100",
                    "--set-json", 'podAnnotations={"x": "y"},training.epochs=3', "--set", "podAnnotations.z=w"], True),
    "json-then-null": ([], ["--set", "training.options=null", "--set-json", 'training.options={"a": 1}'], True),
    "null-in-a-file-then-set": ([{"training": {"options": None}}], ["--set", "training.seed=7"], True),
    # a null for a key without a default stays null in Helm, and the schema refuses it
    "null-without-default": ([{"podLabels": {"team": None}}], [], False),
    # Helm cannot set a key inside a null a file gave
    "set-inside-null": ([{"podSecurityContext": None}], ["--set", "podSecurityContext.runAsUser=5"], False),
    "string-count": ([], ["--set-string", "job.nodes=2"], False),
}


@pytest.mark.parametrize("files,flags,renders", MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_files_flags_and_nulls_merge_as_in_helm(tmp_path, files, flags, renders):
    args = []
    for i, values in enumerate(files):
        path = tmp_path / f"values-{i}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    theirs = helm("template", "merge", str(CHART), *args, *flags)
    ours = run_cli("render", "merge", *args, *flags)
    assert (theirs.returncode == 0) == renders, theirs.stderr
    if renders:
        assert ours.returncode == 0 and ours.stdout == theirs.stdout, ours.stderr
        pick = {"--set": [], "--set-string": [], "--set-json": []}
        for flag, expr in zip(flags[::2], flags[1::2]):
            pick[flag].append(expr)
        files = [tmp_path / f"values-{i}.yaml" for i in range(len(files))]
        assert_tied("merge", resolve_values(files, pick["--set"], pick["--set-string"], pick["--set-json"]),
                    theirs.stdout)
    else:
        assert ours.returncode == 2 and ours.stdout == "" and "Traceback" not in ours.stderr, ours.stderr


def test_every_chart_message_is_raised_by_both_paths():
    """files/messages.yaml owns the refusals: each is used by the template and by the checks `kubetrain run`
    makes without helm, and CHART_FAILURES above makes each one happen in both."""
    messages = yaml.safe_load((REPO / "helm" / "kubetrain" / "files" / "messages.yaml").read_text())
    helpers = (REPO / "helm" / "kubetrain" / "templates" / "_helpers.tpl").read_text()
    python = "".join((REPO / "trainer" / p).read_text() for p in ("config.py", "controller/checks.py"))
    for key in messages:
        assert f"$say.{key}" in helpers, f"{key} is not used by _helpers.tpl"
        assert f'chart_message("{key}"' in python, f"{key} is not used by checks.py or config.py"
    assert len(CHART_FAILURES) >= len(messages)
