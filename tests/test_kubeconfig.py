"""The kubeconfig reader's credentials that change (exec plugins that expire, token files that
rotate) and the in-cluster config, from files in a temporary folder. Against a real kube-apiserver:
tests/cluster/test_kubeconfig_auth.py and test_kube_resilience.py."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import yaml

from support import run_cli
from trainer.controller.kubeconfig import exec_credentials, in_cluster_config, load_cluster_config
from trainer.errors import UserError


def service_account(folder, token="token-1", namespace="team-a"):
    folder.mkdir(exist_ok=True)
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    if namespace is not None:
        (folder / "namespace").write_text(namespace)
    return folder


POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster_reads_the_service_account_and_the_service_address(tmp_path):
    folder = service_account(tmp_path / "sa")
    config = in_cluster_config(folder=folder, environ=POD_ENV)
    assert (config.server, config.namespace, config.source) == ("https://10.0.0.1:443", "team-a", "in-cluster")
    assert config.credentials.token == "token-1" and config.ca_pem.startswith(b"-----BEGIN")
    assert in_cluster_config(folder=folder, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None  # not a pod
    v6 = in_cluster_config("mine", folder=folder, environ={**POD_ENV, "KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert (v6.server, v6.namespace) == ("https://[fd00::1]:443", "mine")
    (folder / "namespace").unlink()
    assert in_cluster_config(folder=folder, environ={**POD_ENV, "POD_NAMESPACE": "ns-env"}).namespace == "ns-env"
    assert in_cluster_config(folder=folder, environ=POD_ENV).namespace == "default"


def test_a_rotated_token_file_is_read_again(tmp_path):
    folder = service_account(tmp_path / "sa")
    credentials = in_cluster_config(folder=folder, environ=POD_ENV).credentials
    assert not credentials.stale()
    # The kubelet swaps a symlink to a new file; a rewrite in place must count as well.
    (folder / "token").write_text("token-2, longer")
    assert credentials.stale()
    renewed = credentials.renew()
    assert renewed.token == "token-2, longer" and not renewed.stale()


def test_in_cluster_without_a_token_is_one_clear_error(tmp_path):
    folder = service_account(tmp_path / "sa")
    (folder / "token").unlink()
    with pytest.raises(UserError, match="in-cluster ServiceAccount token: cannot read .*token"):
        in_cluster_config(folder=folder, environ=POD_ENV)


def test_in_cluster_is_used_only_where_no_kubeconfig_file_exists(tmp_path, monkeypatch):
    import trainer.controller.kubeconfig as kubeconfig

    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", service_account(tmp_path / "sa"))
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert load_cluster_config().source == "in-cluster"
    kc = tmp_path / "kc"
    kc.write_text(yaml.safe_dump({"clusters": [{"name": "c", "cluster": {"server": "https://h:1"}}],
                                  "users": [{"name": "u", "user": {"token": "t"}}],
                                  "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                                  "current-context": "x"}))
    monkeypatch.setenv("KUBECONFIG", str(kc))
    assert load_cluster_config().server == "https://h:1"  # a kubeconfig wins, as in kubectl
    with pytest.raises(UserError, match="no such file"):
        load_cluster_config(str(tmp_path / "missing"))  # an explicit --kubeconfig is never replaced


def test_outside_a_pod_without_a_kubeconfig_says_both(tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "missing"), "KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": ""}
    result = run_cli("list", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "KUBERNETES_SERVICE_HOST is unset: not in a pod" in result.stderr and "no such file" in result.stderr


def plugin(tmp_path, status: dict):
    path = tmp_path / "plugin"
    path.write_text(f"#!{sys.executable}\nopen({str(tmp_path / 'calls')!r}, 'a').write('run\\n')\n"
                    f"print({json.dumps({'kind': 'ExecCredential', 'status': status})!r})\n")
    path.chmod(0o755)
    return {"command": str(path), "interactiveMode": "Never"}


def calls(tmp_path) -> int:
    return len((tmp_path / "calls").read_text().splitlines())


def test_an_exec_credential_is_stale_at_its_expiration_timestamp(tmp_path):
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    credentials = exec_credentials(plugin(tmp_path, {"token": "t", "expirationTimestamp": soon}), tmp_path, "u")
    assert credentials.token == "t" and not credentials.stale()
    assert abs(credentials.expires - (time.time() + 3600)) < 5
    credentials.expires = time.time()
    assert credentials.stale()
    assert credentials.renew().token == "t" and calls(tmp_path) == 2  # renewing runs the plugin again
    forever = exec_credentials(plugin(tmp_path, {"token": "t"}), tmp_path, "u")
    assert not forever.stale() and forever.renew is not None  # no expiry: renewed on a 401 only


def test_a_bad_expiration_timestamp_and_interactive_always_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="expirationTimestamp that is not RFC 3339: 'soon'"):
        exec_credentials(plugin(tmp_path, {"token": "t", "expirationTimestamp": "soon"}), tmp_path, "u")
    spec = {**plugin(tmp_path, {"token": "t"}), "interactiveMode": "Always"}
    with open(os.devnull) as devnull, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", devnull)
        with pytest.raises(UserError, match="needs a terminal"):
            exec_credentials(spec, tmp_path, "u")
