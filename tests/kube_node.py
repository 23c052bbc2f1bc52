"""A real single-node Kubernetes cluster for the node tier, in namespaces of its own.

One `sleep` process holds a new network and mount namespace; every part of the
cluster runs inside them (``nsenter``):

  etcd, kube-apiserver, kube-controller-manager, kube-scheduler   the control plane
  containerd + runc + the bridge CNI plugin                      the container runtime
  kubelet                                                        the node `kubetrain-node`
  CoreDNS (kubernetes plugin)                                    cluster DNS on the node address
  the Kubeflow training operator v1, its validating webhook on   PyTorchJobs -> pods
  JobSet and Kubeflow Trainer v2, with their webhooks            TrainJobs -> JobSets -> Jobs -> pods

The namespace reaches the host only through one veth pair (host 10.251.0.1, node
10.251.0.2) and has no route out, so pods talk to each other, to the node's
address and nothing else. The mount namespace gets a private /run and /var/log;
every mount the kubelet and containerd make (overlays, tmpfs volumes, pod network
namespaces) disappears with it. What lives outside it is put back on stop: the
kubelet's cgroups and the host sysctls it rewrites.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kube_control_plane import (CertAuthority, Cluster, Process, install_crds, openssl, wait_ready,
                                write_kubeconfig)
from kube_operators import WebhookOperator, start_jobset, start_trainer

HOST_IP, NODE_IP = "10.251.0.1", "10.251.0.2"
POD_SUBNET, SERVICE_RANGE = "10.252.0.0/24", "10.253.0.0/24"
NODE_NAME = "kubetrain-node"
APISERVER_PORT, WEBHOOK_PORT = 6443, 9443
OPERATOR_NAMESPACE = "kubeflow"
PAUSE_IMAGE = "kubetrain.test/pause:3.10"
# The kubelet sets these host-wide (pkg/kubelet/cm, setupKernelTunables); we put them back.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
CGROUP_ROOT = "/kubetrain-node"
READY_TIMEOUT_S = 180.0


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class NodeAssets:
    """Where every program and file of the node tier comes from (scripts/install-test-tools.sh)."""

    control_plane: Path      # KUBEBUILDER_ASSETS: etcd, kube-apiserver, kubectl
    node: Path               # KUBETRAIN_NODE_ASSETS: kubelet, scheduler, controller-manager, operator, coredns
    pytorchjob_crd: Path
    monitoring_crds: list[Path]
    trainer_image: str
    images: dict[str, Path]  # image ref -> archive for `ctr images import` (the trainer, pause)
    init_container_template: Path  # k8s/training-operator/init-container.tmpl
    cache: Path              # containerd's image store lives here between runs


class Namespaces:
    """A network + mount namespace held by one `sleep`; `wrap(argv)` runs argv inside."""

    def __init__(self, work: Path):
        (work / "varlog").mkdir()
        script = f"mount -t tmpfs -o mode=755 tmpfs /run && mount --bind {work / 'varlog'} /var/log && exec sleep infinity"
        self.holder = Process("namespace-holder", [
            "unshare", "--net", "--mount", "--propagation", "slave", "--", "sh", "-c", script,
        ], work / "holder.log")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid}/comm").read_text().strip() != "sleep":
            if not self.holder.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"namespace holder did not start: {self.holder.log_tail()}")
            time.sleep(0.05)
        self.host_veth = f"kt{secrets.token_hex(3)}"
        run(["ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid)])
        run(["ip", "addr", "add", f"{HOST_IP}/30", "dev", self.host_veth])
        run(["ip", "link", "set", self.host_veth, "up"])
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{NODE_IP}/30", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"]):
            run(self.wrap(argv))

    @property
    def pid(self) -> int:
        return self.holder.popen.pid

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--", *map(str, argv)]

    def close(self) -> None:
        self.holder.stop(grace_s=2)  # the veth pair, the mounts and the namespaces go with it


@dataclass
class Node:
    """The running cluster. ``cluster`` is the admin view (kubectl, kubeconfigs) tests use."""

    assets: NodeAssets
    work: Path
    cluster: Cluster | None = None
    namespaces: Namespaces | None = None
    procs: list[Process] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def spawn(self, name: str, argv: list, env: dict | None = None) -> Process:
        argv = self.namespaces.wrap(argv)
        if env:
            argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
        proc = Process(name, argv, self.work / f"{name}.log")
        self.procs.append(proc)
        return proc

    def in_node(self, argv: list, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return run(self.namespaces.wrap(argv), check=check, timeout=timeout)

    def ctr(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.in_node(["ctr", "--address", self.work / "containerd.sock", "-n", "k8s.io", *args],
                            check=check, timeout=timeout)

    def _wait(self, what: str, ok, timeout: float = READY_TIMEOUT_S, procs: list[Process] | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in procs or self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                                       f"{p.log_tail()}")
            with contextlib.suppress(Exception):
                if ok():
                    return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.procs[-1].log_tail()}")

    # ------------------------------------------------------------------ start
    def start(self) -> "Node":
        t0 = time.monotonic()
        self.namespaces = Namespaces(self.work)
        self._certificates()
        self._control_plane()
        self.timings["control plane"] = time.monotonic() - t0
        self._containerd()
        self.timings["containerd + images"] = time.monotonic() - t0
        self._kubelet()
        self.timings["node Ready"] = time.monotonic() - t0
        self._coredns()
        self._operator()
        self.timings["operator ready"] = time.monotonic() - t0
        start_jobset(self, NODE_IP)
        start_trainer(self, NODE_IP)
        self.timings["JobSet + Trainer v2 ready"] = time.monotonic() - t0
        return self

    def _certificates(self) -> None:
        w = self.work
        self.ca = CertAuthority(w)
        self.api_cert = self.ca.serving("apiserver", "kube-apiserver", (
            f"IP:{NODE_IP},IP:127.0.0.1,IP:10.253.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc"))
        self.kubelet_cert = self.ca.serving("kubelet-serving", NODE_NAME, f"IP:{NODE_IP},DNS:{NODE_NAME}")
        self.admin = self.ca.client("kubetrain-admin", ("system:masters",))
        self.node_client = self.ca.client(f"system:node:{NODE_NAME}", ("system:nodes",))
        openssl("genrsa", "-out", "sa.key", "2048", cwd=w)
        inside = f"https://127.0.0.1:{APISERVER_PORT}"
        self.kubeconfig = w / "kubeconfig"                  # for the tests, on the host side of the veth
        write_kubeconfig(self.kubeconfig, f"https://{NODE_IP}:{APISERVER_PORT}", self.ca.cert, "kubetrain-admin",
                         *self.admin)
        self.inner_kubeconfig = w / "kubeconfig-inside"      # for the node's own programs
        write_kubeconfig(self.inner_kubeconfig, inside, self.ca.cert, "kubetrain-admin", *self.admin)
        self.kubelet_kubeconfig = w / "kubeconfig-kubelet"
        write_kubeconfig(self.kubelet_kubeconfig, inside, self.ca.cert, f"system:node:{NODE_NAME}",
                         *self.node_client)

    def _control_plane(self) -> None:
        cp, w = self.assets.control_plane, self.work
        self.spawn("etcd", [
            cp / "etcd", "--name=default", f"--data-dir={w / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=default=http://127.0.0.1:2380", "--unsafe-no-fsync=true", "--log-level=warn"])
        self.spawn("kube-apiserver", [
            cp / "kube-apiserver", "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0", f"--advertise-address={NODE_IP}", f"--secure-port={APISERVER_PORT}",
            f"--cert-dir={w / 'certs'}", f"--tls-cert-file={self.api_cert[0]}",
            f"--tls-private-key-file={self.api_cert[1]}", f"--client-ca-file={self.ca.cert}",
            f"--kubelet-client-certificate={self.admin[0]}", f"--kubelet-client-key={self.admin[1]}",
            f"--kubelet-certificate-authority={self.ca.cert}", "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={w / 'sa.key'}", f"--service-account-signing-key-file={w / 'sa.key'}",
            # Webhooks (the operator's) are called at their Endpoints: there is no kube-proxy.
            "--enable-aggregator-routing=true", "--allow-privileged=false", "--profiling=false"])
        wait_ready(f"https://{NODE_IP}:{APISERVER_PORT}", self.ca.cert, *self.admin, self.procs)
        self.cluster = Cluster(server=f"https://{NODE_IP}:{APISERVER_PORT}", kubeconfig=self.kubeconfig,
                               kubectl_path=self.assets.control_plane / "kubectl",
                               crd_path=self.assets.pytorchjob_crd, workdir=w, ca_file=self.ca.cert, _ca=self.ca)
        self.spawn("kube-controller-manager", [
            self.assets.node / "kube-controller-manager", f"--kubeconfig={self.inner_kubeconfig}",
            f"--service-account-private-key-file={w / 'sa.key'}", f"--root-ca-file={self.ca.cert}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10257",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.ca.cert}", f"--cluster-signing-key-file={self.ca.key}"])
        self.spawn("kube-scheduler", [
            self.assets.node / "kube-scheduler", f"--kubeconfig={self.inner_kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259"])
        install_crds(self.cluster, self.assets.pytorchjob_crd, self.assets.monitoring_crds)
        # The controller-manager makes each namespace's `default` ServiceAccount: wait for it.
        self._wait("the default ServiceAccount", lambda: self.cluster.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0)

    def _containerd(self) -> None:
        w = self.work
        root = self.assets.cache / f"containerd-{_containerd_version()}"
        root.mkdir(parents=True, exist_ok=True)
        (w / "cni").mkdir()
        (w / "cni" / "10-kubetrain.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "kubetrain",
            "plugins": [{"type": "bridge", "bridge": "kt0", "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         # Pods reach each other on the bridge and the node's address through it;
                         # no other route, so nothing leaves the namespace.
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                                  "routes": [{"dst": f"{NODE_IP}/32"}], "dataDir": str(w / "cni-ipam")}}]}))
        config = f"""version = 2
root = "{root}"
state = "{w / 'containerd-state'}"
[grpc]
  address = "{w / 'containerd.sock'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine lacks CAP_SYS_RESOURCE: runc may not lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{w / 'cni'}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
        (w / "containerd.toml").write_text(config)
        proc = self.spawn("containerd", ["containerd", "--config", w / "containerd.toml"])
        self._wait("containerd", lambda: self.ctr("version", timeout=10).returncode == 0, procs=[proc])
        self._remove_leftover_containers()
        present = self._remove_stale_images()
        for ref, tarball in self.assets.images.items():
            if not any(_same_image(stored, ref) for stored in present):
                t0 = time.monotonic()
                self.ctr("images", "import", tarball)
                self.timings[f"import {ref}"] = time.monotonic() - t0

    def _remove_stale_images(self) -> set[str]:
        """Older test images go before a new one comes, layers and all: each is gigabytes. The CRI
        plugin keeps a second reference to each image, named by its ID, which goes too.
        Returns the image references that stay."""
        rows = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
        kept = {row[2] for row in rows if any(_same_image(row[0], ref) for ref in self.assets.images)}
        stale = [row[0] for row in rows if row[2] not in kept and (
            "kubetrain/trainer:" in row[0] or row[0].startswith("sha256:"))]
        if stale:
            self.ctr("images", "rm", "--sync", *stale, check=False)
        return {row[0] for row in rows} - set(stale)

    def _remove_leftover_containers(self) -> None:
        """Containers left in the cached store by a run that died: gone before the kubelet starts."""
        for cid in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
            self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            self.ctr("containers", "rm", cid, check=False, timeout=30)

    def _kubelet(self) -> None:
        w = self.work
        self._save_sysctls()
        _make_cgroups(CGROUP_ROOT)
        (w / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0, "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.ca.cert)}},
            "authorization": {"mode": "AlwaysAllow"},  # only the API server's client certificate gets in
            "tlsCertFile": str(self.kubelet_cert[0]), "tlsPrivateKeyFile": str(self.kubelet_cert[1]),
            "cgroupDriver": "cgroupfs", "cgroupRoot": CGROUP_ROOT,
            "containerRuntimeEndpoint": f"unix://{w / 'containerd.sock'}",
            "clusterDNS": [NODE_IP], "clusterDomain": "cluster.local", "resolvConf": str(w / "resolv.conf"),
            "failSwapOn": False, "maxPods": 30,
            # The disk is often over 85% full: never collect the imported images, never evict for disk.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False, "registerNode": True,
            "shutdownGracePeriod": "0s",
        }
        (w / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self.spawn("kubelet", [
            self.assets.node / "kubelet", f"--config={w / 'kubelet.yaml'}",
            f"--kubeconfig={self.kubelet_kubeconfig}", f"--root-dir={w / 'kubelet'}",
            f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            # No CAP_SYS_RESOURCE here: the kubelet may not lower its own oom_score_adj.
            "--oom-score-adj=0", "--v=1"])

        def ready() -> bool:
            got = self.cluster.kubectl("get", "node", NODE_NAME, "-o",
                                       'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)
            return got.stdout.strip() == "True"
        self._wait(f"node {NODE_NAME} Ready", ready)

    def _coredns(self) -> None:
        corefile = self.work / "Corefile"
        # No upstream: the namespace has no route out. Without `cache`, a name asked for before
        # its pod exists is answered afresh once it does.
        corefile.write_text(f"""cluster.local:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:8181
    kubernetes cluster.local {{
        kubeconfig {self.inner_kubeconfig} kubetrain-admin
        pods insecure
    }}
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        proc = self.spawn("coredns", [self.assets.node / "coredns", "-conf", corefile, "-dns.port", "53"])
        self._wait("CoreDNS", lambda: self.http_ok_inside("http://127.0.0.1:8181/ready"), procs=[proc], timeout=60)

    def _operator(self) -> None:
        """The real training operator with its webhook, as its manifests install it, minus the Deployment."""
        manifests = self.assets.node / "operator-manifests" / "base"
        k = self.cluster.kubectl
        k("create", "namespace", OPERATOR_NAMESPACE)
        for path in (manifests / "rbac").glob("*.yaml"):
            doc = yaml.safe_load(path.read_text())
            if doc["kind"] == "ServiceAccount" or doc["kind"] == "ClusterRoleBinding":
                for subject in doc.get("subjects", []):
                    subject["namespace"] = OPERATOR_NAMESPACE
                doc.setdefault("metadata", {})["namespace"] = OPERATOR_NAMESPACE
            self.cluster.apply(doc)
        webhook = list(yaml.safe_load_all((manifests / "webhook" / "manifests.yaml").read_text()))[0]
        webhook["metadata"]["name"] = "validator.training-operator.kubeflow.org"  # webhook/patch.yaml
        for hook in webhook["webhooks"]:
            hook["clientConfig"]["service"].update(name="training-operator", namespace=OPERATOR_NAMESPACE)
        service_port = {"name": "webhook-server", "port": 443, "targetPort": WEBHOOK_PORT, "protocol": "TCP"}
        self.cluster.apply([
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": "training-operator-webhook-cert", "namespace": OPERATOR_NAMESPACE}},
            # The operator runs as a process on the node: a Service without selector, Endpoints at it.
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "training-operator", "namespace": OPERATOR_NAMESPACE},
             "spec": {"ports": [service_port]}},
            {"apiVersion": "v1", "kind": "Endpoints",
             "metadata": {"name": "training-operator", "namespace": OPERATOR_NAMESPACE},
             "subsets": [{"addresses": [{"ip": NODE_IP}],
                          "ports": [{"name": "webhook-server", "port": WEBHOOK_PORT, "protocol": "TCP"}]}]},
            webhook,
        ])
        operator = WebhookOperator("training-operator", OPERATOR_NAMESPACE, "training-operator",
                                   "training-operator-webhook-cert", WEBHOOK_PORT, "127.0.0.1:8081")
        argv = [self.assets.node / "training-operator", "--kubeconfig=/tmp/kubeconfig",
                "--enable-scheme=pytorchjob", "--leader-elect=false",
                f"--webhook-server-port={WEBHOOK_PORT}", "--metrics-bind-address=127.0.0.1:8080",
                "--health-probe-bind-address=127.0.0.1:8081",
                f"--pytorch-init-container-image={self.assets.trainer_image}",
                "--pytorch-init-container-template-file=/tmp/init-container.tmpl"]
        operator.start(self, argv, files={"init-container.tmpl": self.assets.init_container_template.read_text()},
                       env={"MY_POD_NAMESPACE": OPERATOR_NAMESPACE})

        def ca_injected() -> bool:
            got = k("get", "validatingwebhookconfiguration", "validator.training-operator.kubeflow.org",
                    "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}", check=False)
            return bool(got.stdout.strip())
        self._wait("the operator's webhook CA bundle", ca_injected)

    def http_ok_inside(self, url: str) -> bool:
        """GET `url` from inside the node's network namespace (its loopback)."""
        code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
        return self.in_node(["python3", "-c", code], check=False, timeout=10).returncode == 0

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        kubelet = next((p for p in self.procs if p.name == "kubelet"), None)
        if kubelet:
            kubelet.stop()
        if any(p.name == "containerd" and p.alive() for p in self.procs):
            with contextlib.suppress(Exception):
                self._remove_leftover_containers()
        for p in reversed(self.procs):
            p.stop()
        if self.namespaces:
            self.namespaces.close()
        self._restore_sysctls()
        _remove_cgroups(CGROUP_ROOT)

    def leftovers(self) -> list[str]:
        """What stop() should have removed but did not: processes, mounts, the veth, cgroups, sysctls."""
        found = []
        marks = (str(self.work), str(self.assets.node))
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if any(m in cmdline for m in marks):
                        found.append(f"process {proc.name}: {cmdline[:120]}")
        found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
                  if str(self.work) in line]
        if self.namespaces and Path(f"/sys/class/net/{self.namespaces.host_veth}").exists():
            found.append(f"network interface {self.namespaces.host_veth}")
        found += [f"cgroup {h / CGROUP_ROOT.lstrip('/')}" for h in Path("/sys/fs/cgroup").iterdir()
                  if (h / CGROUP_ROOT.lstrip("/")).exists()]
        for key, value in self.sysctls.items():
            with contextlib.suppress(OSError):
                if Path("/proc/sys", key).read_text().strip() != value:
                    found.append(f"sysctl {key} is {Path('/proc/sys', key).read_text().strip()}, was {value}")
        return found

    def _save_sysctls(self) -> None:
        saved = self.assets.cache / "host-sysctls.json"  # survives a run that died before restoring
        if saved.exists():
            self.sysctls = json.loads(saved.read_text())
            self._restore_sysctls(keep_record=True)
        for key in KUBELET_SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[key] = Path("/proc/sys", key).read_text().strip()
        saved.write_text(json.dumps(self.sysctls))

    def _restore_sysctls(self, keep_record: bool = False) -> None:
        for key, value in self.sysctls.items():
            with contextlib.suppress(OSError):
                if Path("/proc/sys", key).read_text().strip() != value:
                    Path("/proc/sys", key).write_text(value)
        if self.sysctls and not keep_record:
            (self.assets.cache / "host-sysctls.json").unlink(missing_ok=True)


def _make_cgroups(root: str) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy (cgroup v1 here; v2 alike)."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue
        top = hierarchy / root.lstrip("/")
        top.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset takes no tasks
            if (top / knob).exists() and not (top / knob).read_text().strip():
                (top / knob).write_text((hierarchy / knob).read_text())


def _remove_cgroups(root: str) -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _containerd_version() -> str:
    out = run(["containerd", "--version"]).stdout.split()
    return out[2] if len(out) > 2 else "unknown"


def _same_image(stored: str, ref: str) -> bool:
    """`stored` (as containerd lists it, with the default registry's domain added) names `ref`."""
    return stored == ref or stored.endswith("/" + ref)


@contextlib.contextmanager
def node_lock(cache: Path):
    """One node per cache at a time: the containerd store and the veth addresses are shared."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
