"""Reading a kubeconfig as kubectl does, for the controller's own REST client.

Files: `--kubeconfig`, else every file in $KUBECONFIG (the first to set a
key wins, as kubectl merges them), else ~/.kube/config. Paths inside a file are
relative to that file. Credentials: client certificates (files or inline
data), bearer tokens (inline or tokenFile), basic auth, and exec plugins
(client.authentication.k8s.io ExecCredential, as cloud providers' CLIs print
them). The old auth-provider plugins are refused with what to use instead.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.chart import SafeLoader
from trainer.errors import UserError


@dataclass
class Credentials:
    """How this client proves who it is: at most one of a certificate pair, a token, or basic auth."""
    cert_pem: bytes = b""
    key_pem: bytes = b""
    token: str = ""
    basic: tuple[str, str] | None = None


@dataclass
class ClusterConfig:
    server: str
    namespace: str
    ca_pem: bytes = b""  # empty: the system's trust store
    insecure: bool = False
    tls_server_name: str = ""
    credentials: Credentials = field(default_factory=Credentials)


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
    )


def user_credentials(user: dict, base: Path, name: str) -> Credentials:
    if user.get("auth-provider"):
        provider = (user["auth-provider"] or {}).get("name", "?")
        raise UserError(f"kubeconfig user {name!r} uses the removed auth-provider {provider!r}; "
                        "switch it to its exec plugin (e.g. gke-gcloud-auth-plugin, kubelogin)")
    if user.get("exec"):
        return exec_credentials(user["exec"], base, name)
    token = str(user.get("token") or "")
    if not token and user.get("tokenFile"):
        token = _read(base, user["tokenFile"], "tokenFile").decode().strip()
    basic = (str(user["username"]), str(user.get("password") or "")) if user.get("username") else None
    return Credentials(cert_pem=_data_or_file(user, "client-certificate", base),
                       key_pem=_data_or_file(user, "client-key", base), token=token, basic=basic)


def exec_credentials(spec: dict, base: Path, name: str) -> Credentials:
    """Run the user's credential plugin and read its ExecCredential (token or client certificate)."""
    command = str(spec.get("command") or "")
    if not command:
        raise UserError(f"kubeconfig user {name!r}: exec has no command")
    if "/" in command and not os.path.isabs(command):
        command = str(base / command)
    env = {**os.environ, **{e["name"]: str(e.get("value", "")) for e in spec.get("env") or [] if "name" in e}}
    api_version = spec.get("apiVersion") or "client.authentication.k8s.io/v1"
    env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": api_version, "kind": "ExecCredential",
                                              "spec": {"interactive": False}})
    try:
        result = subprocess.run([command, *[str(a) for a in spec.get("args") or []]], env=env,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        hint = f" ({spec['installHint']})" if spec.get("installHint") else ""
        raise UserError(f"kubeconfig user {name!r}: cannot run credential plugin {command!r}: {e}{hint}") from None
    if result.returncode != 0:
        raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} exited {result.returncode}: "
                        f"{result.stderr.strip()[-500:]}")
    try:
        status = json.loads(result.stdout)["status"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"kubeconfig user {name!r}: credential plugin {command!r} printed no ExecCredential "
                        "status") from None
    return Credentials(cert_pem=str(status.get("clientCertificateData") or "").encode(),
                       key_pem=str(status.get("clientKeyData") or "").encode(),
                       token=str(status.get("token") or ""))
