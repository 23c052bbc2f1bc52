"""Node tier: a real single-node cluster (tests/kube_node.py) running the trainer image.

The programs come from scripts/install-test-tools.sh: ``KUBEBUILDER_ASSETS``
(etcd, kube-apiserver, kubectl), ``KUBETRAIN_NODE_ASSETS`` (kubelet, scheduler,
controller-manager, the training operator, CoreDNS, the pause image) and the
trainer image built from images/Dockerfile (``KUBETRAIN_TRAINER_IMAGE``,
``KUBETRAIN_TRAINER_IMAGE_TAR``). Where any is absent, or the machine cannot make
namespaces, the tier skips with the reason, unless ``KUBETRAIN_REQUIRE_CLUSTER=1``.

Fixtures:
  node         (session)  the running cluster: ``.cluster`` (kubectl, kubeconfig), ``.spawn``, ``.http_ok_inside``
  node_s3      (session)  moto (a mock S3 server) inside the node's network namespace, reachable from pods
  node_ns      (function) a fresh namespace enforcing Pod Security `restricted`, deleted afterwards
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from kube_control_plane import HOW_TO, monitoring_crd_files, namespace_name, require
from kube_node import NODE_IP, PAUSE_IMAGE, Node, NodeAssets, node_lock
from s3server import CREDENTIALS, S3Server
from support import REPO

NODE_CACHE = Path(os.environ.get("KUBETRAIN_CACHE", Path.home() / ".cache" / "kubetrain")) / "node"
S3_PORT = 9000
HERE = Path(__file__).resolve().parent


def _find_assets() -> NodeAssets:
    if os.geteuid() != 0:
        require("the node tier needs root (network and mount namespaces, containerd, the kubelet)")
    for program in ("unshare", "nsenter", "ip", "containerd", "ctr", "runc", "openssl"):
        if not shutil.which(program):
            require(f"{program} is not on PATH (Debian: containerd, runc, iproute2, util-linux); {HOW_TO}")
    if not Path("/usr/lib/cni/bridge").exists():
        require(f"the CNI bridge plugin is missing (Debian: containernetworking-plugins); {HOW_TO}")
    env = {k: os.environ.get(k, "") for k in ("KUBEBUILDER_ASSETS", "KUBETRAIN_NODE_ASSETS",
                                                "KUBETRAIN_TRAINER_IMAGE", "KUBETRAIN_TRAINER_IMAGE_TAR")}
    missing = [k for k, v in env.items() if not v]
    if missing:
        require(f"{', '.join(missing)} not set; {HOW_TO}")
    control_plane, node = Path(env["KUBEBUILDER_ASSETS"]), Path(env["KUBETRAIN_NODE_ASSETS"])
    crd = os.environ.get("KUBETRAIN_PYTORCHJOB_CRD") or str(
        node / "operator-manifests" / "base" / "crds" / "kubeflow.org_pytorchjobs.yaml")
    for path in [control_plane / "kube-apiserver", node / "kubelet", node / "training-operator",
                 node / "pause.tar", Path(env["KUBETRAIN_TRAINER_IMAGE_TAR"]), Path(crd)]:
        if not path.exists():
            require(f"{path} is missing; {HOW_TO}")
    return NodeAssets(
        control_plane=control_plane, node=node, pytorchjob_crd=Path(crd), monitoring_crds=monitoring_crd_files(control_plane),
        trainer_image=env["KUBETRAIN_TRAINER_IMAGE"],
        images={PAUSE_IMAGE: node / "pause.tar",
                env["KUBETRAIN_TRAINER_IMAGE"]: Path(env["KUBETRAIN_TRAINER_IMAGE_TAR"])},
        init_container_template=REPO / "k8s" / "training-operator" / "init-container.tmpl",
        cache=NODE_CACHE)


_RUNNING: list[Node] = []  # the node, while tests/node runs


def _stop(node: Node) -> None:
    node.stop()
    deadline = time.monotonic() + 10  # the kernel frees a dead namespace's veth pair a moment later
    while (left := node.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "the node tier left behind:\n" + "\n".join(left)


@pytest.hookimpl(trylast=True)  # after the tests' own fixtures (namespaces, releases) are gone
def pytest_runtest_teardown(item, nextitem):
    """Stop the node once the last test here is done, not at the end of the whole session."""
    leaving = nextitem is None or HERE not in Path(str(nextitem.fspath)).resolve().parents
    if _RUNNING and leaving and HERE in Path(str(item.fspath)).resolve().parents:
        _stop(_RUNNING.pop())


@pytest.fixture(scope="session")
def node(tmp_path_factory) -> Node:
    assets = _find_assets()
    with node_lock(assets.cache):
        started = Node(assets, tmp_path_factory.mktemp("node"))
        _RUNNING.append(started)
        try:
            started.start()
            print(f"\nnode tier up: {', '.join(f'{k} {v:.1f}s' for k, v in started.timings.items())}",
                  file=sys.stderr)
            yield started
        finally:
            if _RUNNING:
                _stop(_RUNNING.pop())


@pytest.fixture(scope="session")
def node_s3(node: Node):
    """moto's S3 server inside the node: pods reach it at the node's address, as a cluster S3 service."""
    proc = node.spawn("s3", [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)],
                      env=CREDENTIALS)
    deadline = time.monotonic() + 30
    while not node.http_ok_inside(f"http://127.0.0.1:{S3_PORT}/"):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"moto in the node did not start: {proc.log_tail()}")
        time.sleep(0.3)
    yield S3Server(port=S3_PORT, host=NODE_IP)  # seen from the host and from pods alike
    proc.stop()


@pytest.fixture
def node_ns(node: Node, request) -> str:
    """A fresh namespace per test that enforces Pod Security `restricted`, as k8s/namespace.yaml does."""
    name = namespace_name(request.node.name)
    node.cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}})
    yield name
    node.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
