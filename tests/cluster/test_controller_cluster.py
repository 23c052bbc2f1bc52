"""The controller's cluster verbs against a real kube-apiserver with the real PyTorchJob CRD.

No training operator or kubelet runs here: the real status sequence, pending
reasons and logs are tested on the node tier (tests/node). The one test here that
writes the PyTorchJob status the way the operator does says so in its name: it
needs a compacted watch (410 Gone), which a node cannot be made to produce on cue.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
import time

import pytest
import yaml

from support import REPO, EXAMPLES, heavy_imports, run_cli, tool
from trainer.controller import jobs
from trainer.controller.kube import Kube

pytestmark = pytest.mark.cluster

QUICK = ["-f", str(EXAMPLES / "quickstart.yaml")]


def kt(apiserver, namespace, *args, kubeconfig=None, env=None):
    return run_cli(*args, "--kubeconfig", str(kubeconfig or apiserver.kubeconfig), "-n", namespace, env=env)


def helm(apiserver, *args, env=None):
    return subprocess.run([tool("KUBETRAIN_HELM", "helm"), *args], env={**apiserver.env(), **(env or {})},
                          capture_output=True, text=True, timeout=120)


def releases(apiserver, namespace, env=None) -> dict[str, dict]:
    """`helm list`'s releases in the namespace, by name."""
    listing = helm(apiserver, "list", "-n", namespace, "-o", "json", env=env)
    assert listing.returncode == 0, listing.stderr
    return {r["name"]: r for r in json.loads(listing.stdout)}


def get(apiserver, namespace, kind, name, check=True):
    proc = apiserver.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--show-managed-fields",
                            check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def operator_writes_status(apiserver, namespace, name, *conditions, replicas=None):
    """What the training operator does: append conditions (and replica counts) on /status."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"conditions": [
        {"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": f"job is {t.lower()}",
         "lastUpdateTime": now, "lastTransitionTime": now} for t in conditions]}
    if replicas:
        status["replicaStatuses"] = replicas
    apiserver.kubectl("patch", "pytorchjob", name, "-n", namespace, "--subresource=status",
                      "--type=merge", "-p", json.dumps({"status": status}))


def test_submit_installs_a_helm_release_and_resubmit_is_a_no_op(apiserver, namespace):
    first = kt(apiserver, namespace, "submit", "exp-a", *QUICK)
    assert first.returncode == 0, first.stderr
    assert "pytorchjob/exp-a applied" in first.stdout and "release exp-a revision 1" in first.stdout
    job = get(apiserver, namespace, "pytorchjob", "exp-a")
    assert job["metadata"]["annotations"]["meta.helm.sh/release-name"] == "exp-a"  # the release owns it
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert releases(apiserver, namespace)["exp-a"]["status"] == "deployed"
    assert get(apiserver, namespace, "configmap", "exp-a-config", check=False) or \
        apiserver.kubectl("get", "configmap", "-n", namespace, "-l", "kubetrain.io/experiment=exp-a").stdout

    again = kt(apiserver, namespace, "submit", "exp-a", *QUICK)
    assert again.returncode == 0, again.stderr
    assert "experiment exp-a unchanged" in again.stdout, again.stdout
    job2 = get(apiserver, namespace, "pytorchjob", "exp-a")
    assert job2["metadata"]["resourceVersion"] == job["metadata"]["resourceVersion"]
    assert job2["metadata"]["generation"] == job["metadata"]["generation"]
    assert releases(apiserver, namespace)["exp-a"]["revision"] == "1"  # not even a new revision


def test_different_values_under_a_taken_name_need_force(apiserver, namespace):
    assert kt(apiserver, namespace, "submit", "exp-b", *QUICK).returncode == 0
    refused = kt(apiserver, namespace, "submit", "exp-b", *QUICK, "--set", "job.nodes=3")
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert get(apiserver, namespace, "pytorchjob", "exp-b")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1

    forced = kt(apiserver, namespace, "submit", "exp-b", *QUICK, "--set", "job.nodes=3", "--force")
    assert forced.returncode == 0, forced.stderr
    assert get(apiserver, namespace, "pytorchjob", "exp-b")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert list(releases(apiserver, namespace)) == ["exp-b"]


def test_dry_run_is_validated_by_the_server_and_stores_nothing(apiserver, namespace):
    result = kt(apiserver, namespace, "submit", "exp-dry", *QUICK, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout
    assert get(apiserver, namespace, "pytorchjob", "exp-dry", check=False) is None
    assert releases(apiserver, namespace) == {}


@pytest.mark.parametrize("sets", [
    ["job.nodes=1"],
    ["job.nodes=4,job.nprocPerNode=2,resources.gpu=2"],
    ["job.elastic.enabled=true,job.elastic.minNodes=1,job.elastic.maxNodes=4"],
])
def test_values_the_schema_accepts_the_crd_accepts(apiserver, namespace, sets):
    args = [a for s in sets for a in ("--set", s)]
    result = kt(apiserver, namespace, "submit", "exp-shape", *QUICK, *args, "--dry-run")
    assert result.returncode == 0, result.stderr


def test_status_of_a_missing_experiment_is_a_clear_error(apiserver, namespace):
    result = kt(apiserver, namespace, "status", "nope")
    assert result.returncode == 2 and "no experiment 'nope'" in result.stderr


def test_watch_survives_410_gone_with_operator_status_written_by_test(apiserver, namespace):
    """Start the watch at a resourceVersion the watch cache no longer holds: the server answers
    410 Gone; the watch re-lists and still sees the job finish."""
    assert kt(apiserver, namespace, "submit", "exp-g", *QUICK).returncode == 0
    kube = Kube.connect(str(apiserver.kubeconfig), namespace=namespace)
    out = io.StringIO()
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=jobs.watch(
        kube, "exp-g", out=out, resource_version="1", timeout=60)))
    thread.start()
    deadline = time.monotonic() + 30
    while "exp-g:" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)  # it has read the job; the status written next must reach it by the watch
    operator_writes_status(apiserver, namespace, "exp-g", "Created", "Running", "Failed")
    thread.join(timeout=90)
    assert "410 Gone" in out.getvalue(), out.getvalue()
    assert result.get("code") == 1, out.getvalue()


def test_list_and_delete_touch_only_the_named_experiment(apiserver, namespace):
    assert kt(apiserver, namespace, "submit", "exp-one", *QUICK).returncode == 0
    assert kt(apiserver, namespace, "submit", "exp-two", *QUICK, "--set", "job.nodes=3").returncode == 0
    apiserver.kubectl("create", "configmap", "unrelated", "-n", namespace, "--from-literal=a=b")
    listing = kt(apiserver, namespace, "list")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["exp-one"][1:3] == ["Submitted", "2"] and rows["exp-two"][1:3] == ["Submitted", "3"]

    assert set(releases(apiserver, namespace)) == {"exp-one", "exp-two"}  # helm list agrees
    deleted = kt(apiserver, namespace, "delete", "exp-one")
    assert deleted.returncode == 0, deleted.stderr
    assert "pytorchjob/exp-one deleted" in deleted.stdout and "release exp-one removed" in deleted.stdout
    assert set(releases(apiserver, namespace)) == {"exp-two"}
    left = apiserver.kubectl("get", "pytorchjob,configmap,service,serviceaccount", "-n", namespace,
                             "-o", "name").stdout.split()
    assert not [n for n in left if "exp-one" in n], left
    assert "pytorchjob.kubeflow.org/exp-two" in left and "configmap/unrelated" in left
    assert kt(apiserver, namespace, "delete", "exp-one").returncode == 2  # nothing left to delete


def test_cluster_verbs_import_nothing_heavy(apiserver, namespace):
    """submit, status, logs, list and delete against the real API server never load torch and the like
    (tests/test_cli_startup.py covers render and --help)."""
    target = ["--kubeconfig", str(apiserver.kubeconfig), "-n", namespace]
    # status: 3, not finished; logs: 2, no kubelet runs its pods here
    for verb, code in ((["submit", "exp-i", *QUICK], 0), (["status", "exp-i"], 3),
                       (["logs", "exp-i", "--wait-seconds", "1"], 2), (["list"], 0), (["delete", "exp-i"], 0)):
        result, heavy = heavy_imports(*verb, *target)
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr
        assert not heavy, f"kubetrain {verb[0]} imported {sorted(heavy)}"


def test_helm_and_kubetrain_are_interchangeable(apiserver, namespace):
    """One experiment is one release: helm install, then kubetrain submit of the same values changes
    nothing and kubetrain delete removes every object of it; kubetrain submit, then helm uninstall."""
    apiserver.require_monitoring_crds()
    chart = str(REPO / "helm" / "kubetrain")
    every_kind = ["--set", "rbac.create=true,s3.devSecret.enabled=true,s3.devSecret.accessKeyId=a",
                  "--set", "s3.devSecret.secretAccessKey=b,metrics.podMonitor.enabled=true",
                  "--set", "metrics.prometheusRule.enabled=true"]
    install = helm(apiserver, "install", "exp-helm", chart, "-n", namespace, *QUICK, *every_kind)
    assert install.returncode == 0, install.stderr
    assert get(apiserver, namespace, "pytorchjob", "exp-helm")["metadata"]["name"] == "exp-helm"
    listing = kt(apiserver, namespace, "list")
    assert "exp-helm" in listing.stdout  # helm-installed experiments are kubetrain experiments too
    same = kt(apiserver, namespace, "submit", "exp-helm", *QUICK, *every_kind)
    assert same.returncode == 0 and "unchanged" in same.stdout, same.stdout + same.stderr
    manifest = helm(apiserver, "get", "manifest", "exp-helm", "-n", namespace).stdout
    objects = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest) if d]
    assert {kind for kind, _ in objects} >= {"PyTorchJob", "ConfigMap", "Secret", "Service", "ServiceAccount",
                                             "Role", "PodMonitor", "PrometheusRule"}, objects
    deleted = kt(apiserver, namespace, "delete", "exp-helm")
    assert deleted.returncode == 0, deleted.stderr
    for kind, name in objects:
        assert get(apiserver, namespace, kind, name, check=False) is None, (kind, name)
    assert releases(apiserver, namespace) == {}

    assert kt(apiserver, namespace, "submit", "exp-kt", *QUICK).returncode == 0
    uninstall = helm(apiserver, "uninstall", "exp-kt", "-n", namespace)
    assert uninstall.returncode == 0, uninstall.stderr
    assert get(apiserver, namespace, "pytorchjob", "exp-kt", check=False) is None
    assert "exp-kt" not in kt(apiserver, namespace, "list").stdout


def test_the_chart_role_lets_a_user_submit_watch_and_delete_but_not_read_secrets(apiserver, namespace):
    """With HELM_DRIVER=configmap (helm's own setting, which kubetrain follows) the release records are
    ConfigMaps, so the Role needs no Secrets at all."""
    # An admin installs the Role (rbac.create) bound to user bob, as a platform team would.
    bob_subject = '[{"kind":"User","name":"bob","apiGroup":"rbac.authorization.k8s.io"}]'
    rbac = kt(apiserver, namespace, "submit", "team-rbac", *QUICK, "--set", "rbac.create=true",
              "--set-json", f"rbac.subjects={bob_subject}")
    assert rbac.returncode == 0, rbac.stderr
    apiserver.kubectl("create", "secret", "generic", "s3-keys", "-n", namespace, "--from-literal=k=v")
    bob = apiserver.user_kubeconfig("bob")

    configmaps = {"HELM_DRIVER": "configmap"}
    submitted = kt(apiserver, namespace, "submit", "bob-exp", *QUICK, kubeconfig=bob, env=configmaps)
    assert submitted.returncode == 0, submitted.stderr
    assert kt(apiserver, namespace, "status", "bob-exp", kubeconfig=bob).returncode == 3  # not finished
    assert "bob-exp" in kt(apiserver, namespace, "list", kubeconfig=bob).stdout
    assert "bob-exp" in releases(apiserver, namespace, env={**configmaps, "KUBECONFIG": str(bob)})
    deleted = kt(apiserver, namespace, "delete", "bob-exp", kubeconfig=bob, env=configmaps)
    assert deleted.returncode == 0, deleted.stderr
    assert get(apiserver, namespace, "pytorchjob", "bob-exp", check=False) is None
    assert "bob-exp" not in releases(apiserver, namespace, env=configmaps)

    secrets = apiserver.kubectl("get", "secret", "s3-keys", "-n", namespace, kubeconfig=bob, check=False)
    assert secrets.returncode != 0 and "forbidden" in secrets.stderr.lower()
    can_i = apiserver.kubectl("auth", "can-i", "list", "secrets", "-n", namespace, kubeconfig=bob, check=False)
    assert can_i.stdout.strip() == "no"


def test_logs_waits_for_pending_pods_then_says_why(apiserver, namespace):
    # No kubelet runs here, so no pod ever starts: logs waits, then names what it waited for.
    assert kt(apiserver, namespace, "submit", "exp-l", *QUICK).returncode == 0
    started = time.monotonic()
    result = kt(apiserver, namespace, "logs", "exp-l", "--wait-seconds", "3")
    assert result.returncode == 2 and time.monotonic() - started >= 3
    assert "no logs after 3s" in result.stderr and "training operator" in result.stderr


def test_monitoring_objects_validate_against_their_crds_and_go_with_delete(apiserver, namespace):
    apiserver.require_monitoring_crds()
    monitoring = ["--set", "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
                  "--set-string", "metrics.podMonitor.labels.release=kube-prometheus-stack"]
    submitted = kt(apiserver, namespace, "submit", "exp-mon", *QUICK, *monitoring)
    assert submitted.returncode == 0, submitted.stderr
    assert "podmonitor/exp-mon applied" in submitted.stdout
    rule = get(apiserver, namespace, "prometheusrule", "exp-mon")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    # Every alert the chart's rules file defines, each scoped to this experiment.
    defined = set(re.findall(r"^\s*- alert: (\w+)", (REPO / "helm/kubetrain/files/alert-rules.yaml").read_text(), re.M))
    assert len(defined) >= 7 and alerts == defined
    assert all('experiment="exp-mon"' in r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    monitor = get(apiserver, namespace, "podmonitor", "exp-mon")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert kt(apiserver, namespace, "delete", "exp-mon").returncode == 0
    assert get(apiserver, namespace, "podmonitor", "exp-mon", check=False) is None
    assert get(apiserver, namespace, "prometheusrule", "exp-mon", check=False) is None


def test_a_trainjob_is_validated_listed_followed_and_deleted_like_a_pytorchjob(apiserver, namespace):
    """job.kind: TrainJob against Trainer v2's real CRDs (schema and CEL rules): the same verbs work;
    a second submit under the name with the other kind is refused unless forced."""
    apiserver.require_trainer_crds()
    v2 = [*QUICK, "--set", "job.kind=TrainJob"]
    submitted = kt(apiserver, namespace, "submit", "exp-v2", *v2)
    assert submitted.returncode == 0, submitted.stderr
    assert "trainjob/exp-v2 applied" in submitted.stdout
    job = get(apiserver, namespace, "trainjob", "exp-v2")
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert (job["spec"]["runtimeRef"]["kind"], job["spec"]["runtimeRef"]["name"]) == ("TrainingRuntime", "exp-v2")
    assert get(apiserver, namespace, "trainingruntime", "exp-v2")["spec"]["mlPolicy"]["torch"] == {}

    listing = kt(apiserver, namespace, "list")
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("exp-v2 "))
    assert row[1:3] == ["Submitted", "2"] and row[-1] == "TrainJob", listing.stdout
    status = kt(apiserver, namespace, "status", "exp-v2")
    assert status.returncode == 3 and "Kind:       TrainJob" in status.stdout, status.stdout

    # What Trainer v2 writes when the JobSet completes: status follows it, and says Succeeded.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    apiserver.kubectl("patch", "trainjob", "exp-v2", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {
                          "conditions": [{"type": "Complete", "status": "True", "reason": "JobSetCompleted",
                                          "message": "jobset completed", "lastTransitionTime": now}],
                          "jobsStatus": [{"name": "node", "ready": 0, "succeeded": 1, "failed": 0, "active": 0,
                                          "suspended": 0}]}}))
    status = kt(apiserver, namespace, "status", "exp-v2")
    assert status.returncode == 0 and "State:      Succeeded" in status.stdout, status.stdout
    assert "node     active 0, ready 0, succeeded 1, failed 0, suspended 0" in status.stdout, status.stdout

    refused = kt(apiserver, namespace, "submit", "exp-v2", *QUICK)  # the same name as a PyTorchJob
    assert refused.returncode == 2 and "already exists" in refused.stderr, refused.stderr
    deleted = kt(apiserver, namespace, "delete", "exp-v2")
    assert deleted.returncode == 0 and "trainjob/exp-v2 deleted" in deleted.stdout, deleted.stdout
    assert get(apiserver, namespace, "trainjob", "exp-v2", check=False) is None
    assert "trainingruntime/exp-v2 deleted" in deleted.stdout, deleted.stdout  # a Helm hook: helm leaves it
    assert get(apiserver, namespace, "trainingruntime", "exp-v2", check=False) is None


def test_the_trainjob_crds_cel_rules_run_server_side_and_submit_force_replaces(apiserver, namespace):
    """The CRD's CEL rules (which the v1.31 API server could not compile) run here: its runtime
    reference is immutable, so an in-place change is refused and `submit --force` replaces the job."""
    apiserver.require_trainer_crds()
    v2 = [*QUICK, "--set", "job.kind=TrainJob"]
    assert kt(apiserver, namespace, "submit", "exp-cel", *v2).returncode == 0
    rendered = run_cli("render", "exp-cel", *v2, "--set", "job.runtime=torch-other")
    job = next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "TrainJob")
    refused = apiserver.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-n", namespace,
                                "-f", "-", input=yaml.safe_dump(job), check=False)
    assert refused.returncode != 0 and "field is immutable" in refused.stderr, refused.stderr
    forced = kt(apiserver, namespace, "submit", "exp-cel", *v2, "--set", "job.runtime=torch-other", "--force")
    assert forced.returncode == 0 and "replacing experiment exp-cel" in forced.stdout, forced.stdout + forced.stderr
    assert get(apiserver, namespace, "trainjob", "exp-cel")["spec"]["runtimeRef"]["name"] == "torch-other"
