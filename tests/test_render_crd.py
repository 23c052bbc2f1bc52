"""The PyTorchJob and TrainJob that helm renders from the chart validate against their real CRDs.

The CRDs come from the training-operator and kubeflow/trainer/v2 Go modules through
scripts/install-test-tools.sh ($KUBETRAIN_PYTORCHJOB_CRD, $KUBETRAIN_TRAINER_CRDS). The
TrainJob is checked here, offline and for many values, against the CRD's OpenAPI schema;
the cluster tier installs the same CRDs and has the API server (CEL rules included) accept
it (tests/cluster/test_controller_cluster.py). The API server prunes
unknown fields silently, so objects here must not have any: every schema object
with `properties` is made closed (additionalProperties: false) before validating.
"""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from support import EXAMPLES, helm_objects

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
    **{f"example-{p.stem}": ([p], []) for p in sorted(EXAMPLES.glob("*.yaml")) if "trainjob" not in p.stem},
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
    [job] = [obj for obj in helm_objects("crd-check", files, sets) if obj["kind"] == "PyTorchJob"]
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


TRAINER_CRDS = os.environ.get("KUBETRAIN_TRAINER_CRDS", "")
V2_CASES = {
    "quickstart": ([EXAMPLES / "quickstart.yaml", EXAMPLES / "quickstart-trainjob.yaml"], []),
    "gpus-torchrun": ([], ["job.kind=TrainJob,job.nodes=4,job.nprocPerNode=8,resources.gpu=8",
                           "ncclEnv.NCCL_DEBUG=INFO,kueue.queueName=team-a,job.activeDeadlineSeconds=86400"]),
    "secrets-and-volumes": ([], ["job.kind=TrainJob,s3.credentialsSecret=s3-keys,image.pullSecrets={regcred}",
                                 "nodeSelector.gpu=a100,tolerations[0].key=gpu,tolerations[0].operator=Exists",
                                 "volumes[0].name=data,volumes[0].emptyDir.medium=",
                                 "volumeMounts[0].name=data,volumeMounts[0].mountPath=/data",
                                 "env[0].name=WANDB_MODE,env[0].value=offline"]),
}


@pytest.mark.skipif(not (TRAINER_CRDS and Path(TRAINER_CRDS, "trainer.kubeflow.org_trainjobs.yaml").is_file()),
                    reason="TrainJob CRD not found: set KUBETRAIN_TRAINER_CRDS (scripts/install-test-tools.sh does)")
@pytest.mark.parametrize("files,sets", V2_CASES.values(), ids=V2_CASES.keys())
def test_trainjob_matches_the_crd(files, sets):
    with open(Path(TRAINER_CRDS, "trainer.kubeflow.org_trainjobs.yaml"), encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    validator = jsonschema.Draft4Validator(closed(version["schema"]["openAPIV3Schema"]))
    [job] = [obj for obj in helm_objects("crd-check", files, sets) if obj["kind"] == "TrainJob"]
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert job["spec"]["trainer"]["command"][:3] == ["python", "-m", "trainer.worker.launch"]  # v2 sets PET_* only


@pytest.mark.skipif(not (TRAINER_CRDS and Path(TRAINER_CRDS, "trainer.kubeflow.org_trainingruntimes.yaml").is_file()),
                    reason="TrainingRuntime CRD not found: set KUBETRAIN_TRAINER_CRDS")
@pytest.mark.parametrize("sets", [[], ["job.restartPolicy=Never,image.pullPolicy=Always,schedulerName=volcano"],
                                  ["job.restartPolicy=OnFailure,job.backoffLimit=0,priorityClassName=high"]],
                         ids=["exit-code", "never", "on-failure"])
def test_the_experiments_trainingruntime_matches_the_crd(sets):
    with open(Path(TRAINER_CRDS, "trainer.kubeflow.org_trainingruntimes.yaml"), encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    validator = jsonschema.Draft4Validator(closed(version["schema"]["openAPIV3Schema"]))
    [runtime] = [obj for obj in helm_objects("crd-check", [], ["job.kind=TrainJob", *sets])
                 if obj["kind"] == "TrainingRuntime"]
    errors = sorted(validator.iter_errors(runtime), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
