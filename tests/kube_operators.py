"""Kubeflow Trainer v2 and JobSet on the node tier, installed from their own manifests.

Each controller runs as a process on the node rather than as its Deployment, and
gets what the Deployment would give it: its ServiceAccount's token, its RBAC,
its webhook configurations and a Service (no selector; Endpoints at the node)
in front of its webhook server, and the serving certificates its cert rotator
writes to a Secret, copied to the fixed `/tmp/k8s-webhook-server/serving-certs`
of a private /tmp, as the Secret volume does. The manifests are rendered by
`kubectl kustomize` from each module's own kustomizations; only the parts a
Deployment needs (the Deployment itself, Service selectors, the JobSet CRD's
conversion webhook, which nothing calls with one served version) are dropped.

Ports (every one apart from the v1 operator's 9443/8080/8081):
  JobSet   webhook 9445, health 127.0.0.1:8083, no metrics server
  Trainer  webhook 9446, health 127.0.0.1:8084, no metrics server
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from kube_control_plane import wait_established, write_kubeconfig

JOBSET_NAMESPACE, TRAINER_NAMESPACE = "jobset-system", "kubeflow-system"
JOBSET_WEBHOOK_PORT, TRAINER_WEBHOOK_PORT = 9445, 9446
JOBSET_HEALTH, TRAINER_HEALTH = "127.0.0.1:8083", "127.0.0.1:8084"
TORCH_RUNTIME = "torch-distributed"


@dataclass
class WebhookOperator:
    """One controller process with a webhook server, as its Deployment would run it."""

    name: str                 # the process's (and its log's) name
    namespace: str
    service_account: str
    secret: str               # where its cert rotator keeps the serving certificates
    webhook_port: int
    health: str               # host:port of its /readyz

    def start(self, node, argv: list, files: dict[str, str] | None = None, env: dict | None = None):
        """Run `argv` on the node with a private /tmp holding its kubeconfig (as /tmp/kubeconfig) and `files`."""
        k = node.cluster.kubectl
        token = k("create", "token", self.service_account, "-n", self.namespace, "--duration=48h").stdout.strip()
        self.home = node.work / f"{self.name}-tmp"
        self.home.mkdir()
        write_kubeconfig(self.home / "kubeconfig", "https://127.0.0.1:6443", Path("/tmp/ca.crt"),
                         self.service_account, token=token)  # paths as the process's /tmp shows them
        shutil.copy(node.ca.cert, self.home / "ca.crt")
        for name, text in (files or {}).items():
            (self.home / name).write_text(text)
        script = f'mount --bind "{self.home}" /tmp && exec "$@"'
        node.spawn(self.name, ["unshare", "--mount", "--propagation", "private", "--",
                               "sh", "-c", script, self.name, *argv], env=env)
        node._wait(f"{self.name}'s webhook certificates", lambda: self._certs_mounted(node))
        node._wait(f"{self.name}'s readiness", lambda: node.http_ok_inside(f"http://{self.health}/readyz"))

    def _certs_mounted(self, node) -> bool:
        """What the Deployment's Secret volume does: the rotator's certificates into its cert dir."""
        got = node.cluster.kubectl("get", "secret", self.secret, "-n", self.namespace, "-o", "json")
        data = json.loads(got.stdout).get("data") or {}
        if not {"tls.crt", "tls.key"} <= data.keys():
            return False
        certs = self.home / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True, exist_ok=True)
        for name, value in data.items():
            (certs / name).write_bytes(base64.b64decode(value))
        return True


def as_node_process(docs: list[dict], node_ip: str, webhook_port: int) -> tuple[list[dict], list[dict]]:
    """(CRDs, everything else) of a controller's install, minus what only its Deployment needs.

    Services lose their selector and get Endpoints at the node's address: the webhook server's
    port (the one behind port 443) is the process's `webhook_port`; other ports are not served.
    """
    crds, rest = [], []
    for doc in docs:
        kind = doc["kind"]
        if kind == "Deployment":
            continue
        if kind == "CustomResourceDefinition":
            doc["spec"].pop("conversion", None)
            crds.append(doc)
            continue
        if kind == "Service":
            doc["spec"].pop("selector", None)
            webhook = [p for p in doc["spec"]["ports"] if p.get("port") == 443]
            if webhook:
                rest.append({"apiVersion": "v1", "kind": "Endpoints", "metadata": {
                    "name": doc["metadata"]["name"], "namespace": doc["metadata"]["namespace"]},
                    "subsets": [{"addresses": [{"ip": node_ip}], "ports": [
                        {"name": p.get("name", ""), "port": webhook_port, "protocol": "TCP"} for p in webhook]}]})
        rest.append(doc)
    return crds, rest


def kustomize(node, path: Path) -> list[dict]:
    out = node.cluster.kubectl("kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path), timeout=120)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def install(node, crds: list[dict], rest: list[dict]) -> None:
    node.cluster.apply(crds)  # server-side: these CRDs are too large for client-side apply
    for crd in crds:
        wait_established(node.cluster, crd["metadata"]["name"])
    namespaces = [d for d in rest if d["kind"] == "Namespace"]
    node.cluster.apply(namespaces + [d for d in rest if d["kind"] != "Namespace"])


def start_jobset(node, node_ip: str) -> None:
    """JobSet from config/default (namespace jobset-system, prefix jobset-), with its webhooks."""
    manifests = node.assets.node / "jobset-manifests"
    install(node, *as_node_process(kustomize(node, manifests / "default"), node_ip, JOBSET_WEBHOOK_PORT))
    config = {"apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
              "leaderElection": {"leaderElect": False}, "webhook": {"port": JOBSET_WEBHOOK_PORT},
              "health": {"healthProbeBindAddress": JOBSET_HEALTH}, "metrics": {"bindAddress": "0"},
              "internalCertManagement": {"enable": True}}
    operator = WebhookOperator("jobset", JOBSET_NAMESPACE, "jobset-controller-manager",
                               "jobset-webhook-server-cert", JOBSET_WEBHOOK_PORT, JOBSET_HEALTH)
    operator.start(node, [node.assets.node / "jobset", "--kubeconfig=/tmp/kubeconfig", "--config=/tmp/config.yaml",
                          "--zap-log-level=info"], files={"config.yaml": yaml.safe_dump(config)})


def start_trainer(node, node_ip: str) -> None:
    """Kubeflow Trainer v2 from overlays/manager (namespace kubeflow-system), minus its bundled
    JobSet (a download; start_jobset installs the same release), then the torch runtime."""
    manifests = node.assets.node / "trainer-manifests"
    overlay = yaml.safe_load((manifests / "overlays" / "manager" / "kustomization.yaml").read_text())
    folder = node.work / "trainer-kustomization"
    folder.mkdir()
    # Kustomize takes no absolute roots: the overlay's resources, relative to the new folder.
    overlay["resources"] = [os.path.relpath(manifests / "overlays" / "manager" / r, folder)
                            for r in overlay["resources"] if "third-party" not in r]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    install(node, *as_node_process(kustomize(node, folder), node_ip, TRAINER_WEBHOOK_PORT))
    config = yaml.safe_load((manifests / "base" / "manager" / "controller_manager_config.yaml").read_text())
    config.update(health={**config["health"], "healthProbeBindAddress": TRAINER_HEALTH},
                  metrics={"bindAddress": "0"}, webhook={"port": TRAINER_WEBHOOK_PORT},
                  leaderElection={**config["leaderElection"], "leaderElect": False})
    operator = WebhookOperator("trainer", TRAINER_NAMESPACE, "kubeflow-trainer-controller-manager",
                               "kubeflow-trainer-webhook-cert", TRAINER_WEBHOOK_PORT, TRAINER_HEALTH)
    operator.start(node, [node.assets.node / "trainer-controller-manager", "--kubeconfig=/tmp/kubeconfig",
                          "--config=/tmp/config.yaml"], files={"config.yaml": yaml.safe_dump(config)})
    node.cluster.apply((manifests / "base" / "runtimes" / "torch_distributed.yaml").read_text())
