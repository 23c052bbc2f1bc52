"""The two kinds an experiment's job can be: Kubeflow's v1 PyTorchJob and Trainer v2's TrainJob.

Everything the cluster verbs read differently between them is here: where the
job is served, which pods are its own, which container runs the trainer, how
many nodes it has and what its status says. Both kinds report the same states
(`Succeeded`, `Failed`, `Running`, ...) and name pods as `kubetrain run` names
its processes (`master-0`, `worker-1`, ...), so scripts read either alike.
"""

from __future__ import annotations

from dataclasses import dataclass

# A Job's pods carry their completion index (Kubernetes >= 1.28); in a TrainJob it is the node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


@dataclass(frozen=True)
class JobKind:
    api_version: str
    kind: str
    job_label: str   # on each of the job's pods, with the job's name as value
    container: str   # the container that runs the trainer
    operator: str    # what turns the job into pods, for messages

    @property
    def api(self) -> tuple[str, str]:
        return self.api_version, self.kind

    @property
    def resource_name(self) -> str:
        return self.kind.lower()

    def pod_selector(self, name: str) -> str:
        return f"{self.job_label}={name}"

    # ------------------------------------------------------------ the job
    def nodes(self, job: dict) -> int:
        spec = job.get("spec") or {}
        if self is TRAINJOB:
            return int((spec.get("trainer") or {}).get("numNodes") or 1)
        return sum(int(s.get("replicas", 1)) for s in (spec.get("pytorchReplicaSpecs") or {}).values())

    def procs_per_node(self, job: dict) -> int:
        spec = job.get("spec") or {}
        raw = (spec.get("trainer") or {}).get("numProcPerNode") if self is TRAINJOB else spec.get("nprocPerNode")
        try:
            return int(raw or 1)
        except (TypeError, ValueError):  # "auto", "cpu", "gpu": the runtime decides
            return 1

    def state(self, job: dict) -> str:
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        if self is TRAINJOB:
            return _train_job_state(job, {c.get("type") for c in conditions})
        if not conditions:
            return "Submitted"  # no operator has acted on it yet
        newest = max(enumerate(conditions), key=lambda ic: (str(ic[1].get("lastTransitionTime") or ""), ic[0]))
        return newest[1]["type"]

    def progress_lines(self, job: dict) -> list[str]:
        """What the status says of the job's parts: v1's replica counts, v2's child Jobs and trainer status."""
        status = job.get("status") or {}
        if self is PYTORCHJOB:
            counts = status.get("replicaStatuses") or {}
            return ["Replicas:"] + [f"  {kind:<8} " + ", ".join(f"{k} {c.get(k, 0)}" for k in
                                                               ("active", "succeeded", "failed"))
                                    for kind, c in counts.items()] if counts else []
        lines = []
        jobs = status.get("jobsStatus") or []
        if jobs:
            lines.append("Jobs:")
            lines += [f"  {j.get('name', ''):<8} " + ", ".join(f"{k} {j.get(k) or 0}" for k in
                                                               ("active", "ready", "succeeded", "failed", "suspended"))
                      for j in jobs]
        trainer = status.get("trainerStatus")  # only where the cluster has the TrainJobStatus feature
        if trainer:
            parts = [f"{trainer['progressPercentage']}%" if trainer.get("progressPercentage") is not None else "",
                     f"{trainer['estimatedRemainingSeconds']}s left"
                     if trainer.get("estimatedRemainingSeconds") is not None else ""]
            parts += [f"{m.get('name')} {m.get('value')}" for m in trainer.get("metrics") or []]
            lines.append("Trainer:    " + ", ".join(p for p in parts if p))
        return lines

    # ------------------------------------------------------------ its pods
    def node_index(self, pod: dict) -> int:
        labels = pod["metadata"].get("labels") or {}
        if self is TRAINJOB:
            return int(labels.get(COMPLETION_INDEX, "0") or 0)
        index = int(labels.get("training.kubeflow.org/replica-index", "0") or 0)
        master = labels.get("training.kubeflow.org/replica-type", "").lower() == "master"
        return 0 if master else index + 1

    def replica_prefix(self, pod: dict) -> str:
        """`master-0`, `worker-1`, ... — the same prefixes as `kubetrain run`."""
        return replica_name(self.node_index(pod))


def replica_name(index: int) -> str:
    """Node `index` of a job, as `kubetrain run` and `kubetrain logs` prefix its lines."""
    return "master-0" if index == 0 else f"worker-{index}"


def _train_job_state(job: dict, true: set) -> str:
    """A TrainJob says Complete, Failed or Suspended; running is what its child Jobs say (`active`:
    some pod of the Job runs or is pending, as a PyTorchJob's replicas count; `status` names pending ones)."""
    if "Failed" in true:
        return "Failed"
    if "Complete" in true:
        return "Succeeded"
    if "Suspended" in true:
        return "Suspended"
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    if any(j.get("active") or j.get("ready") for j in jobs):
        return "Running"
    return "Created" if jobs else "Submitted"


PYTORCHJOB = JobKind("kubeflow.org/v1", "PyTorchJob", "training.kubeflow.org/job-name", "pytorch",
                     "the Kubeflow training operator")
# Trainer v2 renders a TrainJob into a JobSet of the same name, whose pods JobSet labels.
TRAINJOB = JobKind("trainer.kubeflow.org/v1alpha1", "TrainJob", "jobset.sigs.k8s.io/jobset-name", "node",
                   "Kubeflow Trainer v2 (with JobSet)")
JOB_KINDS = (PYTORCHJOB, TRAINJOB)


def kind_of(job: dict) -> JobKind:
    return next(k for k in JOB_KINDS if k.kind == job.get("kind"))


def kind_named(kind: str) -> JobKind:
    return next(k for k in JOB_KINDS if k.kind == kind)
