"""The cluster verbs against a real kube-apiserver that serves no Kubeflow API (no CRD installed):
each says which API is missing and exits 2, instead of an empty table or a misleading kind."""

from __future__ import annotations

import pytest

from kube_control_plane import Cluster, apiserver_on_loopback
from support import EXAMPLES, run_cli

pytestmark = pytest.mark.cluster

NEITHER = ("serves neither kubeflow.org/v1 PyTorchJob nor trainer.kubeflow.org/v1alpha1 TrainJob: install the "
           "Kubeflow training operator or Kubeflow Trainer v2 (with JobSet) (their CRDs define them)")
QUICK = ["-f", str(EXAMPLES / "quickstart.yaml")]


@pytest.fixture(scope="module")
def bare_apiserver(tmp_path_factory) -> Cluster:
    with apiserver_on_loopback(tmp_path_factory.mktemp("bare-apiserver"), crds=False) as cluster:
        yield cluster


def kt(cluster: Cluster, *args: str):
    return run_cli(*args, "--kubeconfig", str(cluster.kubeconfig), "-n", "default", timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["list"], NEITHER), (["list", "-A"], NEITHER),  # was: exit 0 and an empty table
    (["status", "exp"], NEITHER), (["logs", "exp"], NEITHER), (["delete", "exp"], NEITHER),  # "no experiment"
    # was: helm's "ensure CRDs are installed first", and with --dry-run a CRD to install per object
    (["submit", "exp", *QUICK], "does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator"),
    (["submit", "exp", *QUICK, "--dry-run"], "does not serve kubeflow.org/v1 PyTorchJob"),
    (["submit", "exp", *QUICK, "--set", "job.kind=TrainJob"],
     "does not serve trainer.kubeflow.org/v1alpha1 TrainJob: install Kubeflow Trainer v2 (with JobSet)"),
])
def test_a_cluster_without_the_kubeflow_crds_is_named(bare_apiserver, args, needle):
    result = kt(bare_apiserver, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: the cluster at {bare_apiserver.server} ") and needle in lines[0], lines[0]
    for selector in ("app.kubernetes.io/part-of=kubetrain", "owner=helm"):  # no object, no release record
        assert not bare_apiserver.kubectl("get", "configmaps,serviceaccounts,secrets", "-n", "default", "-l",
                                          selector, "-o", "name").stdout.strip()
