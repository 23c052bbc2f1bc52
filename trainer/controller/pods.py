"""The pods a job will become, dry-run on the API server before anything is applied.

The schema and the chart's checks hold the values to Kubernetes' types and to the rules that span
keys; the API server's pod validation (and its admission: quotas, policies, mutating webhooks) has
the last word. A PyTorchJob or TrainJob is accepted by its CRD whatever its pod template holds, and
only the operator's pod create fails, once per replica and retry. So `kubetrain submit` builds the
Pod each replica type becomes, as the operator would create it, and POSTs it with dryRun=All; a
refusal names the values key behind the field the server names, and nothing is applied.
"""

from __future__ import annotations

import copy
import re
from typing import TextIO

from trainer.controller.checks import CHART_MOUNTS
from trainer.controller.kube import Kube
from trainer.errors import UserError

# The operator creates replica pods with these restart policies (ExitCode: Never, it restarts them itself).
POD_RESTART = {"ExitCode": "Never", "Always": "Always", "OnFailure": "OnFailure", "Never": "Never"}
# Pod fields the values set, by the key that sets them.
SPEC_KEYS = {"tolerations": "tolerations", "affinity": "affinity", "nodeSelector": "nodeSelector",
             "securityContext": "podSecurityContext", "priorityClassName": "priorityClassName",
             "schedulerName": "schedulerName", "imagePullSecrets": "image.pullSecrets",
             "serviceAccountName": "serviceAccount.name",
             "terminationGracePeriodSeconds": "terminationGracePeriodSeconds"}
CONTAINER_KEYS = {"image": "image.repository/image.tag", "imagePullPolicy": "image.pullPolicy",
                  "resources": "resources", "securityContext": "securityContext"}
FIELD = re.compile(r"\b(metadata\.(?:labels|annotations)|spec\.[A-Za-z]+(?:\[\d+\])?(?:\.[A-Za-z]+(?:\[\d+\])?)*)")


def _pod(name: str, namespace: str, template: dict, restart: str) -> dict:
    template = copy.deepcopy(template)
    metadata = {"name": name, "namespace": namespace, **{k: v for k, v in (template.get("metadata") or {}).items()
                                                         if k in ("labels", "annotations")}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {**template["spec"], "restartPolicy": restart}}


def replica_pods(objects: list[dict], namespace: str) -> list[tuple[str, dict]]:
    """(replica type, its first Pod) for the job among the chart's objects."""
    job = next(o for o in objects if o["kind"] in ("PyTorchJob", "TrainJob"))
    name = job["metadata"]["name"]
    if job["kind"] == "PyTorchJob":
        return [(kind, _pod(f"{name}-{kind.lower()}-0", namespace, spec["template"],
                            POD_RESTART[spec.get("restartPolicy", "Never")]))
                for kind, spec in job["spec"]["pytorchReplicaSpecs"].items()]
    # A TrainJob: the runtime's pod (the chart's own TrainingRuntime, when it renders one) under the
    # chart's patch, with the trainer fields Trainer v2 sets on the `node` container.
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    template = copy.deepcopy(patch["template"]["spec"]["template"])
    runtime = next((o for o in objects if o["kind"] == "TrainingRuntime"), None)
    base = {"restartPolicy": "Never"}
    base_container: dict = {}
    if runtime is not None:
        base = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        base_container = base["containers"][0]
    trainer = job["spec"]["trainer"]
    container = {**{k: v for k, v in base_container.items() if k != "name"}, **template["spec"]["containers"][0],
                 "image": trainer["image"], "command": trainer["command"], "env": trainer["env"],
                 "resources": trainer["resourcesPerNode"]}
    spec = {**{k: v for k, v in base.items() if k != "containers"}, **template["spec"], "containers": [container]}
    return [("node", _pod(f"{name}-node-0-0", namespace, {"metadata": template.get("metadata"), "spec": spec},
                          base.get("restartPolicy", "Never")))]


def values_key(field: str, pod: dict, values: dict) -> str:
    """The values key behind a pod field the API server names (the field itself when none is)."""
    if field.startswith("metadata."):
        return {"metadata.labels": "podLabels", "metadata.annotations": "podAnnotations"}[field]
    own = len(CHART_MOUNTS)
    match = re.match(r"spec\.containers\[0\]\.(\w+)(?:\[(\d+)\])?(.*)", field)
    if match:
        part, index, rest = match.groups()
        if part == "env" and index is not None:
            user = len(values.get("env") or [])
            offset = len(pod["spec"]["containers"][0].get("env") or []) - user
            return f"env[{int(index) - offset}]{rest}" if int(index) >= offset else field
        if part == "volumeMounts" and index is not None and int(index) >= own:
            return f"volumeMounts[{int(index) - own}]{rest}"
        if part in ("env", "volumeMounts") and index is None:  # some messages leave the index out
            attribute = rest.removeprefix(".").split(".")[0]
            having = [i for i, entry in enumerate(values.get(part) or []) if attribute in entry]
            return f"{part}[{having[0]}]{rest}" if len(having) == 1 else f"{part}{rest}"
        return CONTAINER_KEYS.get(part, field)
    match = re.match(r"spec\.volumes\[(\d+)\](.*)", field)
    if match and int(match.group(1)) >= own:
        return f"volumes[{int(match.group(1)) - own}]{match.group(2)}"
    match = re.match(r"spec\.(\w+)(\[\d+\])?(.*)", field)
    if match and match.group(1) in SPEC_KEYS:
        return SPEC_KEYS[match.group(1)] + (match.group(2) or "") + match.group(3)
    return field


def dry_run_pods(kube: Kube, objects: list[dict], values: dict, out: TextIO) -> None:
    """Each replica type's Pod through the API server's validation and admission, stored nowhere."""
    rendered_accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for replica, pod in replica_pods(objects, kube.namespace):
        status, message = kube.dry_run_create(pod)
        if status < 400:
            out.write(f"pod/{pod['metadata']['name']} ({replica}) valid (server dry run)\n")
            continue
        account = pod["spec"].get("serviceAccountName")
        if status == 403 and (account in rendered_accounts or "cannot create resource" in message):
            # RBAC that lets the user create jobs but not pods, or the ServiceAccount this release creates:
            # the operator's pods are unaffected.
            out.write(f"pod/{pod['metadata']['name']} ({replica}) not dry-run: {message}\n")
            continue
        if "does not support dry run" in message:  # a webhook with side effects
            out.write(f"pod/{pod['metadata']['name']} ({replica}) not dry-run: {message}\n")
            continue
        fields = FIELD.findall(message)
        key = values_key(fields[0], pod, values) if fields else "values"
        raise UserError(f"{key}: the API server refuses the {replica} pod the job would create: "
                        + " ".join(message.split()))
