"""helm, the one renderer of the chart and the keeper of releases: `kubetrain render` and `submit`
run it as Argo CD and Flux do, with the user's own -f/--set flags once values.py and checks.py have
accepted them. `KUBETRAIN_HELM` names the binary, else `helm` on PATH; `kubetrain run` never needs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import yaml

from trainer.chart import chart_dir
from trainer.errors import UserError
from trainer.values import HelmValuesLoader

MINIMUM = (3, 17)
NEEDED = f"helm {MINIMUM[0]}.{MINIMUM[1]} or newer"
# Where HELM_DRIVER (read as helm reads it) keeps release records; sql and memory are out of reach.
RELEASE_STORES = {"": ("v1", "Secret"), "secret": ("v1", "Secret"), "secrets": ("v1", "Secret"),
                  "configmap": ("v1", "ConfigMap"), "configmaps": ("v1", "ConfigMap")}


@dataclass(frozen=True)
class ValueFlags:
    """One command line's value flags. helm applies --set-json, --set and --set-string in that order
    whatever the command line's, and trainer/values.py merges them as it does."""

    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    strings: tuple[str, ...] = ()
    jsons: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return [arg for flag, items in (("-f", self.files), ("--set-json", self.jsons), ("--set", self.sets),
                                        ("--set-string", self.strings)) for item in items for arg in (flag, item)]


def binary(verb: str) -> str:
    """The helm to run, or one line saying what to install."""
    named = os.environ.get("KUBETRAIN_HELM")
    found = shutil.which(named) if named else shutil.which("helm")
    if not found:
        where = f"KUBETRAIN_HELM={named} is not an executable" if named else "helm is not on PATH"
        raise UserError(f"kubetrain {verb} runs the chart with helm: {where}; install {NEEDED} "
                        "(or set KUBETRAIN_HELM to its path)")
    return found


def run(verb: str, args: list[str]) -> str:
    """`helm ARGS`, its version checked alongside (both start at once): its stdout, or its error in one line."""
    helm = binary(verb)
    version = subprocess.Popen([helm, "version", "--template", "{{.Version}}"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    proc = subprocess.Popen([helm, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    text = version.communicate()[0].strip()
    found = re.match(r"v?(\d+)\.(\d+)", text)
    if not found or (int(found.group(1)), int(found.group(2))) < MINIMUM:
        proc.kill()
        raise UserError(f"kubetrain {verb} needs {NEEDED}; {helm} is {text or 'of unknown version'}")
    out, err = proc.communicate()
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()] or ["no message"]
        message = re.sub(r"^Error: (?:INSTALLATION FAILED: |UPGRADE FAILED: )?", "", lines[-1])
        raise UserError(f"helm {args[0]} failed: {message}")
    return out


def template(name: str, flags: ValueFlags, include_tests: bool = True, namespace: str | None = None,
             verb: str = "render") -> str:
    """What `helm template NAME CHART FLAGS` prints."""
    namespaced = ["--namespace", namespace] if namespace else []
    return run(verb, ["template", name, str(chart_dir()), *flags.args(), *namespaced,
                      *([] if include_tests else ["--skip-tests"])])


def manifests(stream: str) -> list[dict]:
    """The objects of a `helm template` stream, typed as helm's own YAML reader types them."""
    return [doc for doc in yaml.load_all(stream, Loader=HelmValuesLoader) if doc]


def upgrade_install(name: str, flags: ValueFlags, namespace: str, kubeconfig: str | None,
                    context: str | None) -> str:
    """`helm upgrade --install`: one release per experiment, owning its objects (and taking over
    those an older kubetrain applied without a release)."""
    target = ["--namespace", namespace, *(["--kubeconfig", kubeconfig] if kubeconfig else []),
              *(["--kube-context", context] if context else [])]
    return run("submit", ["upgrade", "--install", name, str(chart_dir()), *flags.args(), *target,
                          "--take-ownership"])


def release_store() -> tuple[str, str] | None:
    """(apiVersion, kind) of helm's release records, as HELM_DRIVER says; None where kubetrain cannot reach."""
    return RELEASE_STORES.get(os.environ.get("HELM_DRIVER", "secret").lower())
