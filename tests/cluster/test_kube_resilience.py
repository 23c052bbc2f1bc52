"""The controller's REST client on a real kube-apiserver when what it runs against changes under it:
exec-plugin tokens that expire (the apiserver asks the test's TokenWebhook, which refuses a token
past its expiry), a server that throttles or is briefly unavailable, connections that drop, and the
in-cluster config of a pod (docs/architecture.md; trainer/controller/kube.py's docstring).
"""

from __future__ import annotations

import io
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from fault_proxy import FaultProxy, http_answer
from support import EXAMPLES, REPO, run_cli
from trainer.controller import jobs
from trainer.controller import kube as kube_module
from trainer.controller import kubeconfig
from trainer.controller.kube import Kube
from trainer.controller.kubeconfig import load_cluster_config
from trainer.errors import UserError

pytestmark = pytest.mark.cluster

USER = "token-user"
LIFETIME_S = 3


@pytest.fixture
def experiment(apiserver, namespace):
    """A submitted experiment, and rights in its namespace for USER (the expiring tokens' user)."""
    apiserver.kubectl("create", "rolebinding", "token-user", "--clusterrole=cluster-admin", f"--user={USER}",
                      "-n", namespace)
    result = run_cli("submit", "exp-r", "-f", str(EXAMPLES / "quickstart.yaml"),
                     "--kubeconfig", str(apiserver.kubeconfig), "-n", namespace)
    assert result.returncode == 0, result.stderr
    return "exp-r"


def expiring_plugin(apiserver, tmp_path, expiry: bool) -> tuple[str, object]:
    """An exec plugin that hands out a new LIFETIME_S token each run, with its expirationTimestamp
    when `expiry`; each run appends its token to a file (its calls)."""
    calls = tmp_path / "plugin-calls"
    status = "{'token': token" + (", 'expirationTimestamp': stamp}" if expiry else "}")
    plugin = tmp_path / "cloud-auth"
    plugin.write_text(
        f"#!{sys.executable}\nimport datetime, json\n"
        + apiserver.token_webhook.expiring_token_source(USER, LIFETIME_S)
        + "stamp = datetime.datetime.fromtimestamp(expires / 1000, datetime.timezone.utc)"
          ".isoformat().replace('+00:00', 'Z')\n"
        + f"open({str(calls)!r}, 'a').write(token + '\\n')\n"
        + "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential', "
          f"'status': {status}}}))\n")
    plugin.chmod(0o755)
    return str(plugin), calls


def kubeconfig_file(tmp_path, server: str, ca, user: dict) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}], "current-context": "ctx"}))
    return str(path)


def exec_user(plugin: str) -> dict:
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": plugin,
                     "interactiveMode": "Never"}}


def tls_proxy(apiserver, answer=lambda: None, drop_after=None) -> FaultProxy:
    """A proxy that terminates TLS (with a certificate the cluster's CA signed) in front of the apiserver."""
    cert, key = apiserver.serving_cert("fault-proxy")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    host, port = apiserver.server.removeprefix("https://").rsplit(":", 1)
    return FaultProxy((host, int(port)), answer, tls=server,
                      upstream_tls=ssl.create_default_context(cafile=str(apiserver.ca_file)), drop_after=drop_after)


def refused(apiserver, token: str) -> bool:
    """Whether the apiserver now answers this bearer token 401."""
    request = urllib.request.Request(f"{apiserver.server}/api", headers={"Authorization": f"Bearer {token}"})
    try:
        urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(apiserver.ca_file)), timeout=30)
    except urllib.error.HTTPError as e:
        return e.code == 401
    return False


def wait_for(condition, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def test_status_watch_outlives_its_exec_token_and_dropped_connections(apiserver, namespace, experiment, tmp_path):
    """Every watch connection is cut after 2 s; the token it was opened with expires after 3 s and
    is refused by the apiserver 10 s after its first use at the latest. The watch keeps going on new
    tokens (the plugin runs again) until the job succeeds."""
    plugin, calls = expiring_plugin(apiserver, tmp_path, expiry=True)
    proxy = tls_proxy(apiserver, drop_after=2)
    config = kubeconfig_file(tmp_path, proxy.endpoint, apiserver.ca_file, exec_user(plugin))
    watch = subprocess.Popen([sys.executable, "-m", "trainer.controller.cli", "status", experiment, "--watch",
                              "--kubeconfig", config, "-n", namespace],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tokens = lambda: calls.read_text().split() if calls.exists() else []  # noqa: E731
        wait_for(lambda: len(tokens()) >= 3 and refused(apiserver, tokens()[0]) or watch.poll() is not None,
                 "three plugin runs and the first token refused")
        assert watch.poll() is None, watch.communicate()
        assert proxy.dropped >= 2, proxy.dropped
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        apiserver.kubectl("patch", "pytorchjob", experiment, "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": {"conditions": [
                              {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                               "message": "done", "lastUpdateTime": now, "lastTransitionTime": now}]}}))
        out, err = watch.communicate(timeout=120)
    finally:
        watch.kill()
        proxy.close()
    assert watch.returncode == 0, err
    assert f"{experiment}: Succeeded" in out and "Traceback" not in err, (out, err)


def test_logs_follow_renews_a_token_without_expiry_on_401(apiserver, namespace, experiment, tmp_path):
    """A plugin that gives no expirationTimestamp: its token is renewed when the apiserver answers 401.
    No kubelet runs here, so `logs --follow` polls for the job's pods until --wait-seconds ends."""
    plugin, calls = expiring_plugin(apiserver, tmp_path, expiry=False)
    config = kubeconfig_file(tmp_path, apiserver.server, apiserver.ca_file, exec_user(plugin))
    refused_before = apiserver.token_webhook.refused
    result = run_cli("logs", experiment, "--follow", "--wait-seconds", "14", "--kubeconfig", config, "-n", namespace)
    assert result.returncode == 2 and "no logs after 14s" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert apiserver.token_webhook.refused > refused_before  # an expired token was sent and refused: 401
    assert len(calls.read_text().split()) >= 2  # ... and the plugin ran again


def test_throttled_unavailable_and_dropped_requests_are_retried(apiserver, namespace, experiment, tmp_path):
    """429 with Retry-After, then 503 without it, then two connections closed before any answer (the
    first is taken for a kept-alive one the server closed: tried again at once; the second waits a
    backoff), then the real apiserver: `list` succeeds."""
    answers = [http_answer("429 Too Many Requests", b'{"message": "slow down"}', "application/json",
                           "Retry-After: 1\r\n"),
               http_answer("503 Service Unavailable", b"upstream connect error"), b"", b""]
    proxy = tls_proxy(apiserver, answer=lambda: answers.pop(0) if answers else None)
    plugin, _ = expiring_plugin(apiserver, tmp_path, expiry=True)
    try:
        config = kubeconfig_file(tmp_path, proxy.endpoint, apiserver.ca_file, exec_user(plugin))
        result = run_cli("list", "--kubeconfig", config, "-n", namespace)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert experiment in result.stdout.split() and proxy.refused == 4, (result.stdout, proxy.refused)


def test_a_server_that_stays_unavailable_is_one_line_naming_it(apiserver, tmp_path, monkeypatch):
    monkeypatch.setattr(kube_module, "RETRY_SECONDS", 3)
    proxy = tls_proxy(apiserver, answer=lambda: http_answer("503 Service Unavailable", b"no healthy upstream"))
    plugin, _ = expiring_plugin(apiserver, tmp_path, expiry=True)
    try:
        kube = Kube(load_cluster_config(kubeconfig_file(tmp_path, proxy.endpoint, apiserver.ca_file,
                                                        exec_user(plugin))))
        with pytest.raises(UserError) as failure:
            kube.list("v1", "ConfigMap")
    finally:
        proxy.close()
    message = str(failure.value)
    assert message.startswith(f"the Kubernetes API server at {proxy.endpoint} still answered 503 no healthy "
                              "upstream after "), message
    assert "in 3s" in message and proxy.refused >= 2


def test_in_cluster_config_lists_with_the_pods_service_account(apiserver, namespace, experiment, tmp_path,
                                                               monkeypatch):
    """What a notebook pod or a CI job has: KUBERNETES_SERVICE_HOST/PORT and a ServiceAccount's token,
    CA and namespace in files; no kubeconfig. A rotated token file is read again."""
    apiserver.kubectl("create", "serviceaccount", "notebook", "-n", namespace)
    resources = "pytorchjobs.kubeflow.org,configmaps" + (",trainjobs.trainer.kubeflow.org" if apiserver.trainer_crds
                                                         else "")
    apiserver.kubectl("create", "role", "list-jobs", "--verb=get,list,watch", f"--resource={resources}", "-n", namespace)
    apiserver.kubectl("create", "rolebinding", "notebook", "--role=list-jobs",
                      f"--serviceaccount={namespace}:notebook", "-n", namespace)
    token = apiserver.kubectl("create", "token", "notebook", "-n", namespace).stdout.strip()
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text("not-a-token-yet")
    (folder / "ca.crt").write_bytes(apiserver.ca_file.read_bytes())
    (folder / "namespace").write_text(namespace)
    host, port = apiserver.server.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", folder)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)

    kube = Kube(load_cluster_config())
    assert kube.config.source == "in-cluster" and kube.namespace == namespace
    with pytest.raises(UserError, match="the API server refused"):
        kube.list("v1", "ConfigMap")
    (folder / "token").write_text(token)  # the kubelet rotated it
    out = io.StringIO()
    assert jobs.list_experiments(kube, out=out) == 0
    assert experiment in out.getvalue().split(), out.getvalue()
