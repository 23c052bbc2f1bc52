"""Cluster tier: a real kube-apiserver + etcd on loopback (envtest style).

The binaries come from ``KUBEBUILDER_ASSETS`` (a folder holding ``etcd``,
``kube-apiserver`` and ``kubectl``), which ``scripts/install-test-tools.sh``
builds and exports. The PyTorchJob CRD comes from ``KUBETRAIN_PYTORCHJOB_CRD``
(or ``$KUBEBUILDER_ASSETS/crds/*/kubeflow.org_pytorchjobs.yaml``).

Where they are absent the tier skips with the reason, unless
``KUBETRAIN_REQUIRE_CLUSTER=1``, in which case it fails with it.

Fixtures:
  apiserver  (session)  ``.kubeconfig``, ``.server``, ``.user_kubeconfig(name)``, ``.kubectl(*args)``
  namespace  (function) a fresh namespace, deleted after the test

Only the ``kubectl`` and ``openssl`` programs and the Python standard library
(plus pyyaml) are used here. There is no controller-manager: namespaces stay
``Terminating`` after deletion, and nothing reconciles PyTorchJobs.
"""

from __future__ import annotations

import pytest

from kube_control_plane import Cluster, apiserver_on_loopback, namespace_name


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory) -> Cluster:
    with apiserver_on_loopback(tmp_path_factory.mktemp("apiserver")) as cluster:
        yield cluster


@pytest.fixture
def namespace(apiserver: Cluster, request) -> str:
    """A fresh namespace for one test; deleted afterwards (without waiting: no
    controller-manager finalizes it)."""
    name = namespace_name(request.node.name)
    apiserver.kubectl("create", "namespace", name)
    yield name
    apiserver.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
