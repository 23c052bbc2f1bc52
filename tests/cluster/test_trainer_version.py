"""`submit` of a TrainJob reads the served TrainJob CRD and refuses a Kubeflow Trainer older than v2.3.0,
whose API server would silently prune what the chart's runtime patch sets (docs/architecture.md: the chart
renders, the CRD decides what is kept). The older CRDs are the released v2.1.0 and v2.2.0 files, trimmed
(tests/fixtures/trainer-crds/, each says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kube_control_plane import HOW_TO, Cluster, apiserver_on_loopback, require, trainer_crd_files, wait_established
from support import EXAMPLES, run_cli

pytestmark = pytest.mark.cluster

OLD_CRDS = Path(__file__).resolve().parent.parent / "fixtures" / "trainer-crds"
TRAINJOB = ["-f", str(EXAMPLES / "quickstart.yaml"), "--set", "job.kind=TrainJob"]
NEEDS = "; kubetrain's TrainJob needs v2.3.0 or later ("


@pytest.fixture(scope="module")
def old_trainer(tmp_path_factory) -> Cluster:
    """An API server with the runtime CRDs of the Trainer the tests use and no TrainJob CRD: each test
    installs an older one (without the check, helm would install the job and the server prune it)."""
    runtimes = [p for p in trainer_crd_files() if "trainjobs" not in p.name]
    if not runtimes:
        require(f"Kubeflow Trainer v2's CRDs are absent (KUBETRAIN_TRAINER_CRDS); {HOW_TO}")
    with apiserver_on_loopback(tmp_path_factory.mktemp("old-trainer"), crds=False) as cluster:
        for path in runtimes:
            cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", str(path))
        yield cluster


def kt(cluster: Cluster, namespace: str, *args: str, kubeconfig: Path | None = None):
    return run_cli(*args, "--kubeconfig", str(kubeconfig or cluster.kubeconfig), "-n", namespace, timeout=120)


@pytest.mark.parametrize("version, lacks, breaks", [
    ("v2.1.0", "its TrainJob CRD has no spec.runtimePatches: v2.1 or older", "the chart's whole runtime patch"),
    ("v2.2.0", "its TrainJob CRD's runtime patches have no terminationGracePeriodSeconds: v2.2",
     "the pods' termination grace period"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_submit_refuses_a_trainer_older_than_v2_3(old_trainer, version, lacks, breaks, dry_run):
    old_trainer.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetrain-tests",
                        "-f", str(OLD_CRDS / f"trainjobs-{version}.yaml"))
    wait_established(old_trainer, "trainjobs.trainer.kubeflow.org")
    result = kt(old_trainer, "default", "submit", "exp", *TRAINJOB, *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: the cluster's Kubeflow Trainer is older than v2.3.0 ({lacks}){NEEDS}")
    assert breaks in lines[0], lines[0]
    assert not result.stdout.strip(), result.stdout  # nothing applied
    for selector in ("app.kubernetes.io/part-of=kubetrain", "owner=helm"):  # no object, no release record
        assert not old_trainer.kubectl("get", "configmaps,serviceaccounts,secrets,trainjobs", "-n", "default",
                                       "-l", selector, "-o", "name").stdout.strip()


def test_submit_passes_v2_3_and_only_warns_a_user_who_may_not_read_crds(apiserver, namespace):
    apiserver.require_trainer_crds()
    admin = kt(apiserver, namespace, "submit", "exp", *TRAINJOB, "--dry-run")
    assert admin.returncode == 0 and not admin.stderr.strip(), admin.stderr
    assert "trainjob/exp applied (server dry run)" in admin.stdout, admin.stdout

    # Everything in the namespace, nothing cluster-wide: the CRD cannot be read, and submit goes on.
    apiserver.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "all"},
         "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "carol-all"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "all"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}]},
    ], namespace=namespace)
    carol = kt(apiserver, namespace, "submit", "exp", *TRAINJOB, "--dry-run",
               kubeconfig=apiserver.user_kubeconfig("carol"))
    assert carol.returncode == 0, carol.stderr
    assert carol.stderr.strip().splitlines() == [
        "warning: may not read CRD trainjobs.trainer.kubeflow.org, so the cluster's Kubeflow Trainer version is "
        "not checked; kubetrain's TrainJob needs v2.3.0 or later"], carol.stderr
    assert "trainjob/exp applied (server dry run)" in carol.stdout, carol.stdout
