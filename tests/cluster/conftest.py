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

import glob
import os
import re
import secrets
from pathlib import Path

import pytest

from kube_control_plane import (
    CertAuthority, Cluster, Process, free_port, openssl, wait_established, wait_ready,
    require, write_kubeconfig,
)

HERE = Path(__file__).resolve().parent
ASSET_BINARIES = ("etcd", "kube-apiserver", "kubectl")
PYTORCHJOB_CRD_NAME = "pytorchjobs.kubeflow.org"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"

# --------------------------------------------------------------------------- pytest hooks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


# --------------------------------------------------------------------------- locating assets
_HOW_TO = 'run: eval "$(scripts/install-test-tools.sh)"'


def _find_assets() -> tuple[Path, Path]:
    assets = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not assets:
        require(f"KUBEBUILDER_ASSETS is not set (no kube-apiserver/etcd); {_HOW_TO}")
    folder = Path(assets)
    missing = [b for b in ASSET_BINARIES if not os.access(folder / b, os.X_OK)]
    if missing:
        require(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}; {_HOW_TO}")
    crd = os.environ.get("KUBETRAIN_PYTORCHJOB_CRD", "")
    if not crd:
        found = sorted(glob.glob(str(folder / "crds" / "*" / "kubeflow.org_pytorchjobs.yaml")))
        crd = found[-1] if found else ""
    if not crd or not Path(crd).is_file():
        require(f"PyTorchJob CRD not found (KUBETRAIN_PYTORCHJOB_CRD={crd or 'unset'}); {_HOW_TO}")
    if not _which("openssl"):
        require("openssl is not on PATH (needed to make the test certificates)")
    return folder, Path(crd)


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory) -> Cluster:
    assets, crd = _find_assets()
    work = tmp_path_factory.mktemp("apiserver")
    procs: list[Process] = []
    try:
        ca = CertAuthority(work)
        serving_cert, serving_key = ca.serving()
        admin_cert, admin_key = ca.client("kubetrain-admin", ("system:masters",))
        openssl("genrsa", "-out", "sa.key", "2048", cwd=work)

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        procs.append(Process("etcd", [
            str(assets / "etcd"),
            "--name=default", f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ], work / "etcd.log"))

        server = f"https://127.0.0.1:{api_port}"
        procs.append(Process("kube-apiserver", [
            str(assets / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--etcd-prefix=/kubetrain-{secrets.token_hex(4)}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={work / 'certs'}",
            f"--tls-cert-file={serving_cert}", f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={ca.cert}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={work / 'sa.key'}",
            f"--service-account-signing-key-file={work / 'sa.key'}",
            # No controller-manager creates the `default` ServiceAccount: do not require it.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--profiling=false",
        ], work / "kube-apiserver.log"))

        wait_ready(server, ca.cert, admin_cert, admin_key, procs)
        kubeconfig = work / "kubeconfig"
        write_kubeconfig(kubeconfig, server, ca.cert, "kubetrain-admin", admin_cert, admin_key)
        cluster = Cluster(server=server, kubeconfig=kubeconfig, kubectl_path=assets / "kubectl",
                          crd_path=crd, workdir=work, ca_file=ca.cert, _ca=ca)
        cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", str(crd))
        wait_established(cluster, PYTORCHJOB_CRD_NAME)
        monitoring = sorted(glob.glob(os.path.join(os.environ.get("KUBETRAIN_MONITORING_CRDS", "") or
                                                   str(assets / "crds" / "prometheus-operator-*"),
                                                   "monitoring.coreos.com_*.yaml")))
        for path in monitoring:  # PodMonitor and PrometheusRule, as kube-prometheus-stack installs them
            cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", path)
            wait_established(cluster, Path(path).stem.split("_", 1)[1] + ".monitoring.coreos.com")
        cluster.monitoring_crds = len(monitoring) >= 2
        yield cluster
    finally:
        for p in reversed(procs):  # kube-apiserver first, then etcd
            p.stop()


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:50].strip("-") or "test"
    return f"{base}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(apiserver: Cluster, request) -> str:
    """A fresh namespace for one test; deleted afterwards (without waiting: no
    controller-manager finalizes it)."""
    name = _namespace_name(request.node.name)
    apiserver.kubectl("create", "namespace", name)
    yield name
    apiserver.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
