"""The rendered PyTorchJob validates against the real PyTorchJob CRD (DESIGN §4).

The CRD comes from the training-operator Go module through
scripts/install-test-tools.sh ($KUBETRAIN_PYTORCHJOB_CRD). The API server prunes
unknown fields silently, so objects here must not have any: every schema object
with `properties` is made closed (additionalProperties: false) before validating.
"""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from support import EXAMPLES
from trainer.controller.render import render_manifests
from trainer.values import resolve_values

CRD = os.environ.get("KUBETRAIN_PYTORCHJOB_CRD", "")
pytestmark = pytest.mark.skipif(
    not (CRD and Path(CRD).is_file()),
    reason="PyTorchJob CRD not found: set KUBETRAIN_PYTORCHJOB_CRD (scripts/install-test-tools.sh does)")


def closed(schema):
    """A copy of an OpenAPI v3 schema in which objects accept only their declared fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    with open(CRD, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(closed(version["schema"]["openAPIV3Schema"]))


CASES = {
    **{f"example-{p.stem}": ([p], []) for p in sorted(EXAMPLES.glob("*.yaml"))},
    "single-node": ([], ["job.nodes=1"]),
    "gpus-torchrun": ([], ["job.nodes=4,job.nprocPerNode=8,resources.gpu=8,ncclEnv.NCCL_DEBUG=INFO"]),
    "elastic-gang-kueue": ([], ["job.elastic.enabled=true,job.elastic.maxNodes=6,job.nodes=3",
                                "job.schedulingPolicy.queue=research,job.schedulingPolicy.minAvailable=3",
                                "job.ttlSecondsAfterFinished=3600,job.activeDeadlineSeconds=86400",
                                "kueue.queueName=team-a,priorityClassName=high,schedulerName=volcano"]),
    "secrets-and-volumes": ([], ["s3.credentialsSecret=s3-keys,image.pullSecrets={regcred}",
                                 "nodeSelector.gpu=a100,tolerations[0].key=gpu,tolerations[0].operator=Exists",
                                 "volumes[0].name=data,volumes[0].emptyDir.medium=",
                                 "volumeMounts[0].name=data,volumeMounts[0].mountPath=/data",
                                 "env[0].name=WANDB_MODE,env[0].value=offline"]),
}


@pytest.mark.parametrize("files,sets", CASES.values(), ids=CASES.keys())
def test_pytorchjob_matches_the_crd(validator, files, sets):
    [job] = [obj for path, obj in render_manifests("crd-check", resolve_values(files, sets))
             if path.endswith("pytorchjob.yaml")]
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
