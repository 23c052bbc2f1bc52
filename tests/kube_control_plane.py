"""A Kubernetes control plane for the test tiers: certificates, child processes, kubeconfigs.

Shared by tests/cluster (kube-apiserver + etcd on loopback) and tests/node (a whole
single-node cluster in network and mount namespaces of its own). Only the `openssl`
and `kubectl` programs, the standard library and pyyaml are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

START_TIMEOUT_S = float(os.environ.get("KUBETRAIN_APISERVER_START_TIMEOUT", "120"))


HOW_TO = 'run: eval "$(scripts/install-test-tools.sh)"'
PYTORCHJOB_CRD_NAME = "pytorchjobs.kubeflow.org"
SKIP_REASONS: list[str] = []  # shown in the terminal summary when a tier skipped


def require(reason: str):
    """Skip the calling tier with `reason`, or fail with it when KUBETRAIN_REQUIRE_CLUSTER=1 (CI)."""
    if os.environ.get("KUBETRAIN_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"KUBETRAIN_REQUIRE_CLUSTER=1 but {reason}", pytrace=False)
    SKIP_REASONS.append(reason)
    pytest.skip(reason)


# --------------------------------------------------------------------------- certificates
def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


class CertAuthority:
    """A throw-away CA in `folder` that signs serving and client certificates."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cert = folder / "ca.crt"
        self.key = folder / "ca.key"
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kubetrain-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=folder,
        )

    def issue(self, stem: str, subject: str, ext: str) -> tuple[Path, Path]:
        extfile = self.folder / f"{stem}.ext"
        extfile.write_text(ext)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key",
                 "-out", f"{stem}.csr", "-subj", subject, cwd=self.folder)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{stem}.crt", "-extfile", extfile.name,
                 cwd=self.folder)
        return self.folder / f"{stem}.crt", self.folder / f"{stem}.key"

    def serving(self, stem: str = "serving", cn: str = "kube-apiserver",
                sans: str = "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default") -> tuple[Path, Path]:
        return self.issue(
            stem, f"/CN={cn}",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
        )

    def client(self, user: str, groups: tuple[str, ...] = ()) -> tuple[Path, Path]:
        subject = "/CN=" + _dn_escape(user) + "".join("/O=" + _dn_escape(g) for g in groups)
        stem = "client-" + re.sub(r"[^A-Za-z0-9_.-]", "_", user)
        return self.issue(
            stem, subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )


def _dn_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("/", "\\/").replace("=", "\\=")


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child: get SIGKILL when pytest dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Process:
    """A child in its own process group (Ctrl-C in the terminal does not reach it;
    we stop it in order), logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.returncode is not None and not self._group_alive():
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=wait_s)
                if not self._group_alive():
                    return

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


# --------------------------------------------------------------------------- expiring tokens
class TokenWebhook:
    """The kube-apiserver's authentication webhook (TokenReview v1), served on loopback by the test
    process, as a cloud's IAM answers for the short-lived tokens its exec plugin hands out (EKS, GKE).

    It accepts a token `expiring_token_source()` printed until the expiry written in it, and counts
    the refusals. The apiserver caches a success for 10 s (its default token cache), so a token is
    refused from 10 s after its first use or its expiry, whichever is later.
    """

    PREFIX = "kubetrain-expiring"

    def __init__(self, work: Path):
        self.refused = 0
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                user = webhook.user_of(str(review.get("spec", {}).get("token", "")))
                status = {"authenticated": True, "user": {"username": user}} if user else {"authenticated": False}
                body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "status": status}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.config = work / "token-webhook.kubeconfig"
        self.config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "webhook", "cluster": {
                "server": f"http://127.0.0.1:{self.server.server_port}/authenticate"}}],
            "users": [{"name": "kube-apiserver", "user": {}}],
            "contexts": [{"name": "webhook", "context": {"cluster": "webhook", "user": "kube-apiserver"}}],
            "current-context": "webhook"}))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def user_of(self, token: str) -> str:
        """The user a token names while it has not expired; "" (and one more refusal) otherwise."""
        prefix, _, rest = token.partition(".")
        if prefix != self.PREFIX:
            return ""  # not ours (another test's wrong token): not a refusal of an expired one
        user, _, expires = rest.partition(".")
        if time.time() < float(expires.partition(".")[0] or 0) / 1000:
            return user
        self.refused += 1
        return ""

    def expiring_token_source(self, user: str, lifetime_s: float) -> str:
        """Python source that prints a new token for `user`, valid for `lifetime_s` from now, and
        its expiry in ms since the epoch (for an exec plugin to put in its ExecCredential)."""
        return (f"import secrets, time\nexpires = int((time.time() + {lifetime_s}) * 1000)\n"
                f"token = f'{self.PREFIX}.{user}.{{expires}}.' + secrets.token_hex(4)\n")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the cluster
@dataclasses.dataclass
class Cluster:
    """A running kube-apiserver + etcd. ``kubeconfig`` is an admin (system:masters) config."""

    server: str
    kubeconfig: Path
    kubectl_path: Path
    crd_path: Path
    workdir: Path
    ca_file: Path
    _ca: CertAuthority = dataclasses.field(repr=False)
    token_webhook: TokenWebhook | None = None  # the cluster tier's: tokens that expire on cue
    monitoring_crds: bool = False  # PodMonitor/PrometheusRule served (prometheus-operator CRDs installed)
    trainer_crds: bool = False     # TrainJob & co served (Kubeflow Trainer v2's CRDs installed)

    def require_monitoring_crds(self) -> None:
        if not self.monitoring_crds:
            require(f"the PodMonitor/PrometheusRule CRDs are absent (KUBETRAIN_MONITORING_CRDS); {HOW_TO}")

    def require_trainer_crds(self) -> None:
        if not self.trainer_crds:
            require(f"Kubeflow Trainer v2's CRDs are absent (KUBETRAIN_TRAINER_CRDS); {HOW_TO}")

    def user_kubeconfig(self, name: str = "alice", groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for user `name` (client certificate; member of `groups` only,
        plus system:authenticated). Without RBAC bindings, such a user may do almost nothing."""
        path = self.workdir / f"kubeconfig-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        if groups:
            path = path.with_name(path.name + "-" + "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", g) for g in groups))
        if not path.exists():
            cert, key = self._ca.client(name, tuple(groups))
            write_kubeconfig(path, self.server, self.ca_file, name, cert, key)
        return path

    def serving_cert(self, stem: str) -> tuple[Path, Path]:
        """A certificate and key for 127.0.0.1 that clients of this cluster trust (its CA signed it)."""
        return self._ca.serving(stem)

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at this cluster (admin unless given)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        return env

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; raise with stderr when it fails and `check`."""
        argv = [str(self.kubectl_path), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.strip()}")
        return proc

    def apply(self, manifest: str | dict | list, namespace: str | None = None,
              dry_run: bool = False, kubeconfig: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        """Server-side apply of a manifest (YAML text, a dict, or a list of dicts)."""
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = yaml.safe_dump_all(docs)
        args = ["apply", "--server-side", "--field-manager=kubetrain-tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        if dry_run:
            args.append("--dry-run=server")
        return self.kubectl(*args, input=manifest, kubeconfig=kubeconfig, check=check)


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None) -> None:
    """A kubeconfig for `user`, by client certificate or by bearer token (a ServiceAccount's)."""
    credentials = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetrain-test", "cluster": {
            "server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "kubetrain-test", "user": user}}],
        "current-context": user,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def wait_ready(server: str, ca: Path, cert: Path, key: Path, procs: list[Process]) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # not up yet: connection refused, 500 while hooks run, ...
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(
        f"kube-apiserver not ready after {START_TIMEOUT_S:.0f}s ({last}):\n{procs[-1].log_tail()}")


def wait_established(cluster: Cluster, crd_name: str, timeout_s: float = 60) -> None:
    # Polled by hand: `kubectl wait` errors out while .status.conditions is still empty.
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cluster.kubectl("get", "crd", crd_name, "-o", f"jsonpath={jsonpath}", check=False)
        if got.stdout.strip() == "True":
            return
        time.sleep(0.2)
    raise RuntimeError(f"CRD {crd_name} not Established after {timeout_s:.0f}s")


def monitoring_crd_files(control_plane_assets: Path) -> list[Path]:
    """The PodMonitor and PrometheusRule CRDs (KUBETRAIN_MONITORING_CRDS, else beside the binaries)."""
    folder = os.environ.get("KUBETRAIN_MONITORING_CRDS", "") or str(control_plane_assets / "crds" /
                                                                      "prometheus-operator-*")
    return sorted(Path(p) for p in glob.glob(os.path.join(folder, "monitoring.coreos.com_*.yaml")))


def trainer_crd_files() -> list[Path]:
    """Kubeflow Trainer v2's CRDs (TrainJob, TrainingRuntime, ClusterTrainingRuntime) and its torch
    runtime, from KUBETRAIN_TRAINER_CRDS; none when it is unset."""
    folder = os.environ.get("KUBETRAIN_TRAINER_CRDS", "")
    return sorted(Path(p) for p in glob.glob(os.path.join(folder, "trainer.kubeflow.org_*.yaml"))) if folder else []


def install_crds(cluster: Cluster, pytorchjob_crd: Path, monitoring: list[Path], trainer: list[Path] = ()) -> None:
    """Server-side apply (these CRDs are too large for client-side) and wait until each is served."""
    cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", str(pytorchjob_crd))
    wait_established(cluster, PYTORCHJOB_CRD_NAME)
    for path in [*monitoring, *trainer]:  # monitoring: as kube-prometheus-stack installs them
        cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", str(path))
        wait_established(cluster, path.stem.split("_", 1)[1] + "." + path.stem.split("_", 1)[0])
    cluster.monitoring_crds = len(monitoring) >= 2
    cluster.trainer_crds = len(trainer) >= 3


def namespace_name(test_name: str) -> str:
    """A namespace per test: the test's name, made DNS-safe, plus a random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:50].strip("-") or "test"
    return f"{base}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- the cluster tier's API server
ASSET_BINARIES = ("etcd", "kube-apiserver", "kubectl")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


def find_assets() -> tuple[Path, Path]:
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


@contextlib.contextmanager
def apiserver_on_loopback(work: Path, crds: bool = True):
    """etcd and kube-apiserver on loopback with the CRDs installed (none with crds=False: a cluster
    without Kubeflow), stopped on exit: yields the Cluster.
    Skips (or fails, under KUBETRAIN_REQUIRE_CLUSTER=1) when the assets are missing."""
    assets, crd = find_assets()
    procs: list[Process] = []
    webhook = TokenWebhook(work)
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
            # Bearer tokens it does not know itself are asked of the test's webhook, uncached by it.
            f"--authentication-token-webhook-config-file={webhook.config}",
            "--authentication-token-webhook-version=v1",
            "--authentication-token-webhook-cache-ttl=0s",
        ], work / "kube-apiserver.log"))

        wait_ready(server, ca.cert, admin_cert, admin_key, procs)
        kubeconfig = work / "kubeconfig"
        write_kubeconfig(kubeconfig, server, ca.cert, "kubetrain-admin", admin_cert, admin_key)
        cluster = Cluster(server=server, kubeconfig=kubeconfig, kubectl_path=assets / "kubectl",
                          crd_path=crd, workdir=work, ca_file=ca.cert, _ca=ca, token_webhook=webhook)
        if crds:
            install_crds(cluster, crd, monitoring_crd_files(assets), trainer_crd_files())
        yield cluster
    finally:
        for p in reversed(procs):  # kube-apiserver first, then etcd
            p.stop()
        webhook.close()
