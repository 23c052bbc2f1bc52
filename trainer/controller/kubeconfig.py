"""Reading a kubeconfig as kubectl does, for the controller's own REST client.

Files: `--kubeconfig`, else every file in $KUBECONFIG (the first to set a
key wins, as kubectl merges them), else ~/.kube/config. Paths inside a file are
relative to that file. Credentials: client certificates (files or inline
data), bearer tokens (inline or tokenFile), basic auth, and exec plugins
(client.authentication.k8s.io ExecCredential, as cloud providers' CLIs print
them). The old auth-provider plugins are refused with what to use instead.

Credentials that change carry a `renew`: an exec plugin is run again when its
expirationTimestamp has passed or the server answers 401, a token file is read
again when it changes (kube.py decides when). With no kubeconfig file at all
and KUBERNETES_SERVICE_HOST/PORT set, the ServiceAccount of the pod is used,
as client-go's rest.InClusterConfig does: a notebook pod or a CI job needs no
kubeconfig.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import yaml

from trainer.chart import SafeLoader
from trainer.errors import UserError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # a pod's token, ca.crt, namespace
EXPIRY_MARGIN_S = 1.0  # renew this long before an exec credential expires: a request should not cross it


@dataclass
class Credentials:
    """How this client proves who it is: at most one of a certificate pair, a token, or basic auth."""
    cert_pem: bytes = b""
    key_pem: bytes = b""
    token: str = ""
    basic: tuple[str, str] | None = None
    expires: float | None = None  # epoch seconds (an exec plugin's expirationTimestamp)
    token_file: Path | None = None  # read again when it changes: projected ServiceAccount tokens rotate
    token_stamp: tuple = ()
    renew: Callable[[], "Credentials"] | None = field(default=None, repr=False, compare=False)

    def stale(self) -> bool:
        """Expired, or the token file changed since it was read: `renew` before the next request."""
        if self.expires is not None and time.time() >= self.expires - EXPIRY_MARGIN_S:
            return True
        return self.token_file is not None and _stamp(self.token_file) != self.token_stamp


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)  # follows the kubelet's ..data symlink, which it swaps on rotation
    except OSError:
        return ()
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class ClusterConfig:
    server: str
    namespace: str
    ca_pem: bytes = b""  # empty: the system's trust store
    insecure: bool = False
    tls_server_name: str = ""
    credentials: Credentials = field(default_factory=Credentials)
    source: str = ""  # where it came from: a kubeconfig file or "in-cluster"


def kubeconfig_files(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    listed = [Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return listed or [Path.home() / ".kube" / "config"]


def _merged(files: list[Path], where: str) -> dict:
    """kubectl's merge: named entries and scalars from the first file that has them."""
    merged: dict = {"clusters": {}, "users": {}, "contexts": {}, "current-context": None}
    found = False
    for path in files:
        if not path.is_file():
            continue
        found = True
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=SafeLoader) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot load a kubeconfig from {path}: {e}") from None
        if not isinstance(doc, dict):
            raise UserError(f"cannot load a kubeconfig from {path}: not a mapping")
        for section, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in doc.get(section) or []:
                if isinstance(entry, dict) and entry.get("name") and entry["name"] not in merged[section]:
                    merged[section][entry["name"]] = (entry.get(inner) or {}, path.parent)
        merged["current-context"] = merged["current-context"] or doc.get("current-context") or None
    if not found:
        raise UserError(f"cannot load a kubeconfig from {where}: no such file")
    return merged


def _read(base: Path, value: str, what: str) -> bytes:
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"kubeconfig {what}: cannot read {path}: {e.strerror}") from None


def _data_or_file(entry: dict, key: str, base: Path) -> bytes:
    if entry.get(f"{key}-data"):
        try:
            return base64.b64decode(entry[f"{key}-data"])
        except ValueError:
            raise UserError(f"kubeconfig {key}-data is not base64") from None
    return _read(base, entry[key], key) if entry.get(key) else b""


def load_cluster_config(kubeconfig: str | None = None, context: str | None = None,
                        namespace: str | None = None) -> ClusterConfig:
    files = kubeconfig_files(kubeconfig)
    where = kubeconfig or "KUBECONFIG / ~/.kube/config"
    if not kubeconfig and not context and not any(path.is_file() for path in files):
        found = in_cluster_config(namespace)  # kubectl's rule: in a pod, no kubeconfig means its ServiceAccount
        if found is not None:
            return found
        where += " (and KUBERNETES_SERVICE_HOST is unset: not in a pod)"
    config = _merged(files, where)
    name = context or config.get("current-context")
    if not name:
        raise UserError(f"cannot load a kubeconfig from {where}: no current-context; pass --context")
    if name not in config["contexts"]:
        raise UserError(f"cannot load a kubeconfig from {where}: no context {name!r} "
                        f"(contexts: {', '.join(sorted(config['contexts'])) or 'none'})")
    ctx, _ = config["contexts"][name]
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if cluster_name not in config["clusters"]:
        raise UserError(f"kubeconfig context {name!r} names cluster {cluster_name!r}, which is not defined")
    cluster, cluster_base = config["clusters"][cluster_name]
    if not cluster.get("server"):
        raise UserError(f"kubeconfig cluster {cluster_name!r} has no server")
    user, user_base = config["users"].get(user_name, ({}, Path.cwd()))
    return ClusterConfig(
        server=str(cluster["server"]).rstrip("/"),
        namespace=namespace or ctx.get("namespace") or "default",
        ca_pem=_data_or_file(cluster, "certificate-authority", cluster_base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=str(cluster.get("tls-server-name") or ""),
        credentials=user_credentials(user, user_base, user_name or ""),
        source=", ".join(str(p) for p in files if p.is_file()),
    )


def in_cluster_config(namespace: str | None = None, folder: Path | None = None,
                      environ: dict | None = None) -> ClusterConfig | None:
    """The pod's ServiceAccount (token, ca.crt, namespace under `folder`) and the API server the kubelet
    names in KUBERNETES_SERVICE_HOST/PORT; None outside a pod."""
    environ = os.environ if environ is None else environ
    folder = folder or SERVICE_ACCOUNT_DIR
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        return None
    credentials = token_file_credentials(folder / "token", "in-cluster ServiceAccount token")
    ca = folder / "ca.crt"
    try:
        ca_pem = ca.read_bytes()
    except OSError as e:
        raise UserError(f"in-cluster config: cannot read {ca}: {e.strerror}") from None
    if not namespace:
        try:
            namespace = environ.get("POD_NAMESPACE") or (folder / "namespace").read_text().strip()
        except OSError:
            namespace = ""
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return ClusterConfig(server=server, namespace=namespace or "default", ca_pem=ca_pem,
                         credentials=credentials, source="in-cluster")


def token_file_credentials(path: Path, what: str) -> Credentials:
    """A bearer token from a file, read again when the file changes or the server answers 401."""
    stamp = _stamp(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return Credentials(token=token, token_file=path, token_stamp=stamp,
                       renew=lambda: token_file_credentials(path, what))


def user_credentials(user: dict, base: Path, name: str) -> Credentials:
    if user.get("auth-provider"):
        provider = (user["auth-provider"] or {}).get("name", "?")
        raise UserError(f"kubeconfig user {name!r} uses the removed auth-provider {provider!r}; "
                        "switch it to its exec plugin (e.g. gke-gcloud-auth-plugin, kubelogin)")
    if user.get("exec"):
        return exec_credentials(user["exec"], base, name)
    token = str(user.get("token") or "")
    if not token and user.get("tokenFile"):
        path = Path(os.path.expanduser(str(user["tokenFile"])))
        return token_file_credentials(path if path.is_absolute() else base / path, "kubeconfig tokenFile")
    basic = (str(user["username"]), str(user.get("password") or "")) if user.get("username") else None
    return Credentials(cert_pem=_data_or_file(user, "client-certificate", base),
                       key_pem=_data_or_file(user, "client-key", base), token=token, basic=basic)


def exec_credentials(spec: dict, base: Path, name: str) -> Credentials:
    """Run the user's credential plugin and read its ExecCredential (token or client certificate).

    As kubectl: the plugin is interactive (stdin and stderr are the terminal's) when `interactiveMode`
    allows and stdin is a terminal; `Always` without one is refused."""
    command = str(spec.get("command") or "")
    if not command:
        raise UserError(f"kubeconfig user {name!r}: exec has no command")
    if "/" in command and not os.path.isabs(command):
        command = str(base / command)
    env = {**os.environ, **{e["name"]: str(e.get("value", "")) for e in spec.get("env") or [] if "name" in e}}
    api_version = spec.get("apiVersion") or "client.authentication.k8s.io/v1"
    mode = str(spec.get("interactiveMode") or "IfAvailable")
    interactive = mode != "Never" and sys.stdin is not None and sys.stdin.isatty()
    if mode == "Always" and not interactive:
        raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} needs a terminal "
                        "(interactiveMode: Always) and stdin is not one")
    env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": api_version, "kind": "ExecCredential",
                                              "spec": {"interactive": interactive}})
    try:
        result = subprocess.run([command, *[str(a) for a in spec.get("args") or []]], env=env,
                                stdin=None if interactive else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=None if interactive else subprocess.PIPE, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        hint = f" ({spec['installHint']})" if spec.get("installHint") else ""
        raise UserError(f"kubeconfig user {name!r}: cannot run credential plugin {command!r}: {e}{hint}") from None
    if result.returncode != 0:
        raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} exited {result.returncode}: "
                        f"{(result.stderr or '').strip()[-500:]}")
    try:
        status = json.loads(result.stdout)["status"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} printed no ExecCredential "
                        "status") from None
    expires = None
    if status.get("expirationTimestamp"):
        try:
            expires = datetime.fromisoformat(str(status["expirationTimestamp"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} printed an "
                            f"expirationTimestamp that is not RFC 3339: {status['expirationTimestamp']!r}") from None
    return Credentials(cert_pem=str(status.get("clientCertificateData") or "").encode(),
                       key_pem=str(status.get("clientKeyData") or "").encode(),
                       token=str(status.get("token") or ""), expires=expires,
                       renew=lambda: exec_credentials(spec, base, name))
