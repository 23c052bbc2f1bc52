"""The controller's own kubeconfig reader against a real kube-apiserver: each way of proving who you are.

Client certificates from files are what every other cluster test uses. Here:
inline certificate data, a ServiceAccount bearer token (inline and tokenFile),
an exec credential plugin (as EKS, GKE and AKS kubeconfigs use), several
files merged through $KUBECONFIG, and the clear errors when one is wrong.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import yaml

from support import EXAMPLES, run_cli

pytestmark = pytest.mark.cluster


@pytest.fixture
def experiment(apiserver, namespace):
    result = run_cli("submit", "exp-auth", "-f", str(EXAMPLES / "quickstart.yaml"),
                     "--kubeconfig", str(apiserver.kubeconfig), "-n", namespace)
    assert result.returncode == 0, result.stderr
    return "exp-auth"


@pytest.fixture
def sa_token(apiserver, namespace):
    """A ServiceAccount token with rights in the test namespace only."""
    apiserver.kubectl("create", "serviceaccount", "ci-bot", "-n", namespace)
    apiserver.kubectl("create", "rolebinding", "ci-bot", "--clusterrole=cluster-admin",
                      f"--serviceaccount={namespace}:ci-bot", "-n", namespace)
    return apiserver.kubectl("create", "token", "ci-bot", "-n", namespace).stdout.strip()


def config(apiserver, user: dict, cluster: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster or {"server": apiserver.server,
                                                            "certificate-authority": str(apiserver.ca_file)}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "ctx"}


def write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def listing(namespace, *args, env=None):
    return run_cli("list", "-n", namespace, *args, env=env)


def assert_lists(result, name):
    assert result.returncode == 0, result.stderr
    assert name in result.stdout.split(), result.stdout


def test_inline_certificate_data(apiserver, namespace, experiment, tmp_path):
    admin = yaml.safe_load(apiserver.kubeconfig.read_text())["users"][0]["user"]
    b64 = lambda p: base64.b64encode(open(p, "rb").read()).decode()  # noqa: E731
    doc = config(apiserver, {"client-certificate-data": b64(admin["client-certificate"]),
                             "client-key-data": b64(admin["client-key"])},
                 {"server": apiserver.server, "certificate-authority-data": b64(apiserver.ca_file)})
    assert_lists(listing(namespace, "--kubeconfig", write(tmp_path / "kc", doc)), experiment)


def test_service_account_token_inline_and_from_a_file(apiserver, namespace, experiment, sa_token, tmp_path):
    assert_lists(listing(namespace, "--kubeconfig", write(tmp_path / "kc", config(apiserver, {"token": sa_token}))),
                 experiment)
    (tmp_path / "token").write_text(sa_token + "\n")
    doc = config(apiserver, {"tokenFile": "token"})  # relative to the kubeconfig's folder
    assert_lists(listing(namespace, "--kubeconfig", write(tmp_path / "kc2", doc)), experiment)


def test_exec_credential_plugin(apiserver, namespace, experiment, sa_token, tmp_path):
    plugin = tmp_path / "cloud-auth"
    credential = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": sa_token}}
    plugin.write_text("#!/bin/sh\n"
                      'test "$(echo "$KUBERNETES_EXEC_INFO" | grep -c ExecCredential)" = 1 || exit 9\n'
                      f'test "$AUDIENCE" = kubetrain || exit 8\ncat <<EOF\n{json.dumps(credential)}\nEOF\n')
    plugin.chmod(0o755)
    doc = config(apiserver, {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                                      "args": ["token"], "env": [{"name": "AUDIENCE", "value": "kubetrain"}]}})
    assert_lists(listing(namespace, "--kubeconfig", write(tmp_path / "kc", doc)), experiment)

    failing = config(apiserver, {"exec": {"command": "false"}})
    result = listing(namespace, "--kubeconfig", write(tmp_path / "bad", failing))
    assert result.returncode == 2 and "credential plugin 'false' exited 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_files_merged_through_kubeconfig_env(apiserver, namespace, experiment, tmp_path):
    """kubectl's rule: the first file that sets a name or current-context wins."""
    full = config(apiserver, {"token": "not-this-one"})
    admin = yaml.safe_load(apiserver.kubeconfig.read_text())
    first = {"users": [{"name": "u", "user": admin["users"][0]["user"]}], "current-context": "ctx"}
    env = {"KUBECONFIG": os.pathsep.join([write(tmp_path / "first", first), write(tmp_path / "second", full)])}
    assert_lists(listing(namespace, env=env), experiment)


def test_a_wrong_kubeconfig_is_one_clear_line(apiserver, namespace, tmp_path):
    doc = config(apiserver, {"token": "x"})
    path = write(tmp_path / "kc", doc)
    cases = [
        (["--kubeconfig", str(tmp_path / "missing")], "cannot load a kubeconfig from", "no such file"),
        (["--kubeconfig", path, "--context", "nope"], "no context 'nope'", "contexts: ctx"),
        (["--kubeconfig", path], "the API server refused", ""),  # a token the server does not know
    ]
    for args, needle, more in cases:
        result = listing(namespace, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and more in result.stderr and "Traceback" not in result.stderr, result.stderr
    unreachable = config(apiserver, {"token": "x"}, {"server": "https://127.0.0.1:1",
                                                    "certificate-authority": str(apiserver.ca_file)})
    result = listing(namespace, "--kubeconfig", write(tmp_path / "down", unreachable))
    assert result.returncode == 2 and "cannot reach the Kubernetes API server at https://127.0.0.1:1" in result.stderr
