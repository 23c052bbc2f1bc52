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

import contextlib
import ctypes
import dataclasses
import glob
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ASSET_BINARIES = ("etcd", "kube-apiserver", "kubectl")
PYTORCHJOB_CRD_NAME = "pytorchjobs.kubeflow.org"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
START_TIMEOUT_S = float(os.environ.get("KUBETRAIN_APISERVER_START_TIMEOUT", "120"))

_skip_reason: str | None = None  # shown in the terminal summary when the tier skipped


# --------------------------------------------------------------------------- pytest hooks
def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cluster: needs a real kube-apiserver and etcd (KUBEBUILDER_ASSETS); "
        "skipped where absent unless KUBETRAIN_REQUIRE_CLUSTER=1",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


def pytest_terminal_summary(terminalreporter):
    if _skip_reason:
        terminalreporter.write_sep("-", "cluster tier skipped")
        terminalreporter.write_line(_skip_reason)


# --------------------------------------------------------------------------- locating assets
def _require(reason: str):
    """Skip the cluster tier with `reason`, or fail with it when the tier is required."""
    global _skip_reason
    if os.environ.get("KUBETRAIN_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"KUBETRAIN_REQUIRE_CLUSTER=1 but {reason}", pytrace=False)
    _skip_reason = reason
    pytest.skip(reason)


_HOW_TO = 'run: eval "$(scripts/install-test-tools.sh)"'


def _find_assets() -> tuple[Path, Path]:
    assets = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not assets:
        _require(f"KUBEBUILDER_ASSETS is not set (no kube-apiserver/etcd); {_HOW_TO}")
    folder = Path(assets)
    missing = [b for b in ASSET_BINARIES if not os.access(folder / b, os.X_OK)]
    if missing:
        _require(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}; {_HOW_TO}")
    crd = os.environ.get("KUBETRAIN_PYTORCHJOB_CRD", "")
    if not crd:
        found = sorted(glob.glob(str(folder / "crds" / "*" / "kubeflow.org_pytorchjobs.yaml")))
        crd = found[-1] if found else ""
    if not crd or not Path(crd).is_file():
        _require(f"PyTorchJob CRD not found (KUBETRAIN_PYTORCHJOB_CRD={crd or 'unset'}); {_HOW_TO}")
    if not _which("openssl"):
        _require("openssl is not on PATH (needed to make the test certificates)")
    return folder, Path(crd)


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


# --------------------------------------------------------------------------- certificates
def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


class _CertAuthority:
    """A throw-away CA in `folder` that signs serving and client certificates."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cert = folder / "ca.crt"
        self.key = folder / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kubetrain-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=folder,
        )

    def issue(self, stem: str, subject: str, ext: str) -> tuple[Path, Path]:
        extfile = self.folder / f"{stem}.ext"
        extfile.write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key",
                 "-out", f"{stem}.csr", "-subj", subject, cwd=self.folder)
        _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{stem}.crt", "-extfile", extfile.name,
                 cwd=self.folder)
        return self.folder / f"{stem}.crt", self.folder / f"{stem}.key"

    def serving(self) -> tuple[Path, Path]:
        return self.issue(
            "serving", "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default\n",
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
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when pytest dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Process:
    """A child in its own process group (Ctrl-C in the terminal does not reach it;
    we stop it in order), logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
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
    _ca: _CertAuthority = dataclasses.field(repr=False)
    monitoring_crds: bool = False  # PodMonitor/PrometheusRule served (prometheus-operator CRDs installed)

    def require_monitoring_crds(self) -> None:
        if not self.monitoring_crds:
            _require(f"the PodMonitor/PrometheusRule CRDs are absent (KUBETRAIN_MONITORING_CRDS); {_HOW_TO}")

    def user_kubeconfig(self, name: str = "alice", groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for user `name` (client certificate; member of `groups` only,
        plus system:authenticated). Without RBAC bindings, such a user may do almost nothing."""
        path = self.workdir / f"kubeconfig-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        if groups:
            path = path.with_name(path.name + "-" + "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", g) for g in groups))
        if not path.exists():
            cert, key = self._ca.client(name, tuple(groups))
            _write_kubeconfig(path, self.server, self.ca_file, name, cert, key)
        return path

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


def _write_kubeconfig(path: Path, server: str, ca: Path, user: str, cert: Path, key: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetrain-test", "cluster": {
            "server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": user, "context": {"cluster": "kubetrain-test", "user": user}}],
        "current-context": user,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def _wait_ready(server: str, ca: Path, cert: Path, key: Path, procs: list[_Process]) -> None:
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


def _wait_established(cluster: Cluster, crd_name: str, timeout_s: float = 60) -> None:
    # Polled by hand: `kubectl wait` errors out while .status.conditions is still empty.
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cluster.kubectl("get", "crd", crd_name, "-o", f"jsonpath={jsonpath}", check=False)
        if got.stdout.strip() == "True":
            return
        time.sleep(0.2)
    raise RuntimeError(f"CRD {crd_name} not Established after {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory) -> Cluster:
    assets, crd = _find_assets()
    work = tmp_path_factory.mktemp("apiserver")
    procs: list[_Process] = []
    try:
        ca = _CertAuthority(work)
        serving_cert, serving_key = ca.serving()
        admin_cert, admin_key = ca.client("kubetrain-admin", ("system:masters",))
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=work)

        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        procs.append(_Process("etcd", [
            str(assets / "etcd"),
            "--name=default", f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ], work / "etcd.log"))

        server = f"https://127.0.0.1:{api_port}"
        procs.append(_Process("kube-apiserver", [
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

        _wait_ready(server, ca.cert, admin_cert, admin_key, procs)
        kubeconfig = work / "kubeconfig"
        _write_kubeconfig(kubeconfig, server, ca.cert, "kubetrain-admin", admin_cert, admin_key)
        cluster = Cluster(server=server, kubeconfig=kubeconfig, kubectl_path=assets / "kubectl",
                          crd_path=crd, workdir=work, ca_file=ca.cert, _ca=ca)
        cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", str(crd))
        _wait_established(cluster, PYTORCHJOB_CRD_NAME)
        monitoring = sorted(glob.glob(os.path.join(os.environ.get("KUBETRAIN_MONITORING_CRDS", "") or
                                                   str(assets / "crds" / "prometheus-operator-*"),
                                                   "monitoring.coreos.com_*.yaml")))
        for path in monitoring:  # PodMonitor and PrometheusRule, as kube-prometheus-stack installs them
            cluster.kubectl("apply", "--server-side", "--field-manager=kubetrain-tests", "-f", path)
            _wait_established(cluster, Path(path).stem.split("_", 1)[1] + ".monitoring.coreos.com")
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
