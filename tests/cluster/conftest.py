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
import secrets
import shutil
from pathlib import Path

import pytest

from kube_control_plane import (
    HOW_TO, CertAuthority, Cluster, Process, free_port, install_crds, monitoring_crd_files, namespace_name,
    openssl, require, trainer_crd_files, wait_ready, write_kubeconfig,
)

ASSET_BINARIES = ("etcd", "kube-apiserver", "kubectl")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


# --------------------------------------------------------------------------- locating assets
def _find_assets() -> tuple[Path, Path]:
    assets = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not assets:
        require(f"KUBEBUILDER_ASSETS is not set (no kube-apiserver/etcd); {HOW_TO}")
    folder = Path(assets)
    missing = [b for b in ASSET_BINARIES if not os.access(folder / b, os.X_OK)]
    if missing:
        require(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}; {HOW_TO}")
    crd = os.environ.get("KUBETRAIN_PYTORCHJOB_CRD", "")
    if not crd:
        found = sorted(glob.glob(str(folder / "crds" / "*" / "kubeflow.org_pytorchjobs.yaml")))
        crd = found[-1] if found else ""
    if not crd or not Path(crd).is_file():
        require(f"PyTorchJob CRD not found (KUBETRAIN_PYTORCHJOB_CRD={crd or 'unset'}); {HOW_TO}")
    if not shutil.which("openssl"):
        require("openssl is not on PATH (needed to make the test certificates)")
    return folder, Path(crd)




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
        install_crds(cluster, crd, monitoring_crd_files(assets), trainer_crd_files())
        yield cluster
    finally:
        for p in reversed(procs):  # kube-apiserver first, then etcd
            p.stop()


@pytest.fixture
def namespace(apiserver: Cluster, request) -> str:
    """A fresh namespace for one test; deleted afterwards (without waiting: no
    controller-manager finalizes it)."""
    name = namespace_name(request.node.name)
    apiserver.kubectl("create", "namespace", name)
    yield name
    apiserver.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
