"""The helm binary: the one renderer of the chart (`helm template`) and the keeper of releases.

render and submit run it as Argo CD and Flux do, with the user's own `-f`/`--set`
flags, so what they print and apply is what `helm template`/`helm install` gives
for the same command line. `KUBETRAIN_HELM` names the binary, else `helm` on PATH;
`kubetrain run` never needs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from trainer.chart import chart_dir
from trainer.errors import UserError

MINIMUM = (3, 17)
NEEDED = f"helm {MINIMUM[0]}.{MINIMUM[1]} or newer"


@dataclass(frozen=True)
class ValueFlags:
    """The value sources of one command line, as helm takes them (it applies --set-json, --set and
    --set-string in that order whatever the command line's, which trainer/values.py follows)."""

    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    strings: tuple[str, ...] = ()
    jsons: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out: list[str] = []
        for flag, items in (("-f", self.files), ("--set-json", self.jsons), ("--set", self.sets),
                            ("--set-string", self.strings)):
            for item in items:
                out += [flag, item]
        return out


def binary(verb: str) -> str:
    """The helm to run, or one line saying what to install."""
    named = os.environ.get("KUBETRAIN_HELM")
    found = shutil.which(named) if named else shutil.which("helm")
    if not found:
        where = f"KUBETRAIN_HELM={named} is not an executable" if named else "helm is not on PATH"
        raise UserError(f"kubetrain {verb} runs the chart with helm: {where}; install {NEEDED} "
                        "(or set KUBETRAIN_HELM to its path)")
    return found


def _check_version(helm: str, text: str, verb: str) -> None:
    match = re.match(r"v?(\d+)\.(\d+)", text.strip())
    if not match or (int(match.group(1)), int(match.group(2))) < MINIMUM:
        raise UserError(f"kubetrain {verb} needs {NEEDED}; {helm} is {text.strip() or 'of unknown version'}")


def run(verb: str, args: list[str], stdin: str | None = None, env: dict | None = None) -> str:
    """Run `helm ARGS` (its version checked alongside); its stdout, or its error as one line."""
    helm = binary(verb)
    version = subprocess.Popen([helm, "version", "--template", "{{.Version}}"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        proc = subprocess.Popen([helm, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
        version.kill()
        raise UserError(f"kubetrain {verb}: cannot run {helm}: {e.strerror}") from None
    _check_version(helm, version.communicate()[0], verb)
    out, err = proc.communicate(stdin)
    if proc.returncode != 0:
        raise UserError(f"helm {args[0]} failed: {_one_line(err)}")
    return out


def _one_line(stderr: str) -> str:
    """helm's error, without its `Error: ` prefix and the chart's template location."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no message"
    text = text.removeprefix("Error: ")
    return re.sub(r"^(?:INSTALLATION FAILED|UPGRADE FAILED): ", "", text)


def template(name: str, flags: ValueFlags, include_tests: bool = True, namespace: str | None = None) -> str:
    """What `helm template NAME CHART FLAGS` prints."""
    args = ["template", name, str(chart_dir()), *flags.args()]
    if namespace:
        args += ["--namespace", namespace]
    if not include_tests:
        args.append("--skip-tests")
    return run("render", args)


def cluster_args(namespace: str, kubeconfig: str | None, context: str | None) -> list[str]:
    args = ["--namespace", namespace]
    if kubeconfig:
        args += ["--kubeconfig", kubeconfig]
    if context:
        args += ["--kube-context", context]
    return args


def upgrade_install(name: str, flags: ValueFlags, cluster: list[str]) -> str:
    """`helm upgrade --install`: one release per experiment, its objects owned by the release (taking
    over those an older kubetrain applied without one)."""
    return run("submit", ["upgrade", "--install", name, str(chart_dir()), *flags.args(), *cluster,
                          "--take-ownership"])


def release_driver() -> tuple[str, str] | None:
    """Where helm keeps release records (HELM_DRIVER, as helm reads it): (apiVersion, kind), or None
    for a store kubetrain cannot reach (sql, memory)."""
    driver = os.environ.get("HELM_DRIVER", "secret").lower()
    return {"secret": ("v1", "Secret"), "secrets": ("v1", "Secret"), "": ("v1", "Secret"),
            "configmap": ("v1", "ConfigMap"), "configmaps": ("v1", "ConfigMap")}.get(driver)


def release_selector(name: str) -> str:
    """The labels helm puts on every record of one release."""
    return f"owner=helm,name={name}"
