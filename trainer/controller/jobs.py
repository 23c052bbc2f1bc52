"""The cluster verbs: submit, status, logs, list and delete one experiment.

An experiment is one Helm release of the chart, however it was installed
(`kubetrain submit` or `helm install`): everything the chart renders for the
release name, found again through the `kubetrain.io/experiment` label; its job is
a PyTorchJob or a TrainJob (trainer/controller/kinds.py reads either). The job
carries the chart's digest of the values, so submitting the same values twice
changes nothing while different values under a taken name are refused unless forced.
"""

from __future__ import annotations

import codecs
import datetime
import io
import sys
import threading
import time
from typing import Iterator, TextIO

from trainer.controller.kinds import JOB_KINDS, TRAINJOB, JobKind, kind_of
from trainer.controller.kube import EXPERIMENT_KINDS, ApiError, Forbidden, Kube, experiment_selector
from trainer.errors import UserError
from trainer.summary import find

SPEC_HASH = "kubetrain.io/spec-hash"
TERMINAL = {"Succeeded": 0, "Failed": 1}
EXIT_NOT_FINISHED = 3  # `status` of a job that is still pending or running


# ---------------------------------------------------------------- the job APIs
def _api(kind: JobKind) -> str:
    return f"{kind.api_version} {kind.kind}"


def require_a_job_api(kube: Kube) -> None:
    """A cluster without Kubeflow's CRDs has no experiments to list or find: say which APIs are missing
    rather than show an empty table or "no experiment"."""
    if all(kube.resource(*kind.api) is None for kind in JOB_KINDS):
        raise UserError(f"the cluster at {kube.config.server} serves neither "
                        + " nor ".join(_api(kind) for kind in JOB_KINDS)
                        + ": install " + " or ".join(kind.operator for kind in JOB_KINDS) + " (their CRDs define them)")


def require_job_api(kube: Kube, job: dict) -> None:
    """The API of the job the chart rendered (job.kind picks it) is served, before helm or any object."""
    kind = next(k for k in JOB_KINDS if k.kind == job["kind"])
    if kube.resource(*kind.api) is not None:
        return
    other = [k for k in JOB_KINDS if k is not kind and kube.resource(*k.api) is not None]
    instead = f", or set job.kind={other[0].kind} (the cluster serves {_api(other[0])})" if other else ""
    raise UserError(f"the cluster at {kube.config.server} does not serve {_api(kind)}: install {kind.operator} "
                    f"(its CRD defines it){instead}")


# ---------------------------------------------------------------- Trainer's version
TRAINJOB_CRD = "trainjobs.trainer.kubeflow.org"
_PATCHED_POD = "spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template.spec"
# What the chart's TrainJob relies on that Kubeflow Trainer's released CRDs first declare in v2.3.0 (v2.1 has
# podTemplateOverrides instead of runtimePatches; v2.2's patched pod spec has no grace period). The API server
# prunes a field its CRD does not declare without an error (helm applies client-side), so an older Trainer
# would run the job without it: (path, what the CRD lacks, what breaks).
TRAINER_NEEDS = [
    ("spec.runtimePatches", "its TrainJob CRD has no spec.runtimePatches: v2.1 or older",
     "the API server would drop the chart's whole runtime patch: the pods' service account, termination grace "
     "period, volumes, security context and scheduling"),
    (f"{_PATCHED_POD}.terminationGracePeriodSeconds",
     "its TrainJob CRD's runtime patches have no terminationGracePeriodSeconds: v2.2",
     "the API server would drop the pods' termination grace period, so a preempted rank has no time to commit "
     "its checkpoint"),
]


def schema_keeps(schema: dict, path: str) -> bool:
    """Whether a CRD's structural schema keeps `path` (`a.b[].c`) rather than pruning it."""
    node = schema
    for part in path.split("."):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        node = (node.get("properties") or {}).get(part.removesuffix("[]"))
        if node is None:
            return False
        if part.endswith("[]"):
            node = node.get("items") or {}
    return True


def require_trainer_version(kube: Kube, err: TextIO = sys.stderr) -> None:
    """Refuse a TrainJob where the served CRD is older than Trainer v2.3.0; a user who may not read CRDs
    gets a warning and goes on."""
    try:
        crd = kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", TRAINJOB_CRD) or {}
    except Forbidden:
        err.write(f"warning: may not read CRD {TRAINJOB_CRD}, so the cluster's Kubeflow Trainer version is not "
                  f"checked; kubetrain's TrainJob needs v2.3.0 or later\n")
        err.flush()
        return
    version = TRAINJOB.api_version.split("/")[1]
    served = next((v for v in (crd.get("spec") or {}).get("versions") or [] if v.get("name") == version), {})
    schema = (served.get("schema") or {}).get("openAPIV3Schema")
    for path, lacks, breaks in TRAINER_NEEDS if schema else ():
        if not schema_keeps(schema, path):
            raise UserError(f"the cluster's Kubeflow Trainer is older than v2.3.0 ({lacks}); "
                            f"kubetrain's TrainJob needs v2.3.0 or later ({breaks})")


# ---------------------------------------------------------------- submit
def submit(kube: Kube, name: str, flags, target: tuple[str | None, str | None], dry_run: bool = False,
           force: bool = False, wait: bool = False, out: TextIO = sys.stdout, values: dict | None = None) -> int:
    """Install or upgrade the experiment's Helm release: `flags` are the user's value flags (already
    checked, `values` what they resolve to), `target` the --kubeconfig and --context given, which helm
    gets too. The job's pods are dry-run first (trainer/controller/pods.py)."""
    from trainer.controller import helm  # only submit runs helm: the other verbs skip its imports
    from trainer.controller.pods import dry_run_pods

    objects = helm.manifests(helm.template(name, flags, False, kube.namespace, verb="submit"))
    job = next(obj for obj in objects if obj["kind"] in {kind.kind for kind in JOB_KINDS})
    require_job_api(kube, job)
    if kind_of(job) is TRAINJOB:
        require_trainer_version(kube)
    if values is not None:  # reported on a dry run; a refusal stops either
        dry_run_pods(kube, objects, values, out if dry_run else io.StringIO())
    digest = spec_hash(job)
    existing = find_job(kube, name)
    if existing is not None:
        theirs = spec_hash(existing)
        if theirs != digest and not force:
            raise UserError(
                f"experiment {name!r} already exists in namespace {kube.namespace!r} with different "
                f"values (spec {theirs or 'unknown'} vs {digest}); pick another name, "
                f"`kubetrain delete {name}`, or pass --force to replace it"
            )
        if theirs == digest and not dry_run:
            out.write(f"experiment {name} unchanged (spec {digest}): nothing applied\n")
            out.flush()
            return watch(kube, name, out=out) if wait else 0
        if not dry_run:
            out.write(f"replacing experiment {name} (spec {theirs or 'unknown'} -> {digest})\n")
            delete(kube, name, out=out)
            _wait_gone(kube, name)
    if dry_run:
        for obj in objects:
            kube.apply(obj, dry_run=True)
            out.write(f"{obj['kind'].lower()}/{obj['metadata']['name']} applied (server dry run)\n")
        out.flush()
        return 0
    report = helm.upgrade_install(name, flags, kube.namespace, *target)
    revision = next((line.split(":", 1)[1].strip() for line in report.splitlines() if line.startswith("REVISION:")),
                    "?")
    for obj in objects:
        out.write(f"{obj['kind'].lower()}/{obj['metadata']['name']} applied\n")
    out.write(f"release {name} revision {revision} in namespace {kube.namespace} "
              f"(`helm list` shows it; `helm uninstall` or `kubetrain delete` removes it)\n")
    out.flush()
    if wait:
        return watch(kube, name, out=out)
    return 0


def spec_hash(obj: dict) -> str | None:
    """The chart's digest of its version and the values (`kubetrain.specHash`), on the job."""
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH)


def find_job(kube: Kube, name: str) -> dict | None:
    """The experiment's PyTorchJob or TrainJob (a cluster may serve either API, or both)."""
    for kind in JOB_KINDS:
        job = kube.get(*kind.api, name)
        if job is not None:
            return {**job, "kind": kind.kind}
    return None


def _wait_gone(kube: Kube, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (job := find_job(kube, name)) is not None:
        if time.monotonic() > deadline:
            raise UserError(f"{job['kind'].lower()}/{name} is still being deleted after {timeout:.0f}s")
        time.sleep(0.5)


# ---------------------------------------------------------------- status
def job_state(job: dict) -> str:
    """Submitted, Created, Running, Restarting, Suspended, Succeeded or Failed, for either kind."""
    return kind_of(job).state(job)


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "-"
    created = datetime.datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _pod_status(pod: dict) -> dict:
    return pod.get("status") or {}


def _restarts(pod: dict) -> int:
    return sum(s.get("restartCount") or 0 for s in _pod_status(pod).get("containerStatuses") or [])


def pending_reason(kube: Kube, pod: dict) -> str:
    """Why a pod waits: its scheduling condition, else its newest warning event."""
    for cond in _pod_status(pod).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") != "True":
            return f"{cond.get('reason')}: {cond.get('message')}"
    for status in _pod_status(pod).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason')}: {waiting.get('message') or ''}".strip()
    warnings = [e for e in kube.pod_events(pod["metadata"]["name"]) if e.get("type") == "Warning"]
    return f"{warnings[-1].get('reason')}: {warnings[-1].get('message')}" if warnings else ""


def describe(kube: Kube, job: dict, out: TextIO) -> None:
    kind = kind_of(job)
    meta, status = job["metadata"], job.get("status") or {}
    out.write(f"Name:       {meta['name']}\nNamespace:  {meta.get('namespace')}\nKind:       {kind.kind}\n"
              f"State:      {job_state(job)}\nAge:        {_age(meta.get('creationTimestamp'))}\n"
              f"Nodes:      {kind.nodes(job)}\n")
    for line in kind.progress_lines(job):
        out.write(line + "\n")
    conditions = status.get("conditions") or []
    if conditions:
        out.write("Conditions:\n")
        for c in conditions:
            out.write(f"  {c.get('type', ''):<11} {c.get('status', ''):<6} {c.get('reason', '')}: "
                      f"{c.get('message', '')}\n")
    pods = kube.pods(kind, meta["name"])
    out.write("Pods:\n" if pods else "Pods:       none yet\n")
    for pod in pods:
        phase = _pod_status(pod).get("phase") or "Unknown"
        why = f"  ({pending_reason(kube, pod)})" if phase == "Pending" else ""
        out.write(f"  [{kind.replica_prefix(pod)}] {pod['metadata']['name']:<40} {phase:<10} "
                  f"restarts {_restarts(pod)}{why}"
                  f"{termination(pod, kind.container)}\n")
    out.flush()


def termination(pod: dict, container: str) -> str:
    """How the trainer's container failed: now (a failed pod), or last time (before a restart)."""
    for status in _pod_status(pod).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        now = (status.get("state") or {}).get("terminated")
        last = (status.get("lastState") or {}).get("terminated")
        for ended, label in ((now, ""), (last, "last ")):
            if ended and ended.get("exitCode"):
                text = (ended.get("message") or "").strip()
                summary = find(text)  # the trainer's summary (its termination message), else log lines
                if summary is not None:
                    text = summary.get("error") or f"{summary.get('status')} at step {summary.get('steps')}"
                message = f": {text.splitlines()[-1]}" if text else ""
                return f"  {label}exit code {ended['exitCode']} ({ended.get('reason') or 'Error'}){message}"
    return ""


def _require_job(kube: Kube, name: str) -> dict:
    job = find_job(kube, name)
    if job is None:
        require_a_job_api(kube)
        raise UserError(f"no experiment {name!r} in namespace {kube.namespace!r} (`kubetrain list` shows them)")
    return job


def status(kube: Kube, name: str, follow: bool = False, out: TextIO = sys.stdout) -> int:
    job = _require_job(kube, name)
    describe(kube, job, out)
    if follow:
        return watch(kube, name, out=out)
    return TERMINAL.get(job_state(job), EXIT_NOT_FINISHED)


def watch(kube: Kube, name: str, out: TextIO = sys.stdout, resource_version: str | None = None,
          timeout: float | None = None) -> int:
    """Follow the job with the watch API until Succeeded or Failed.

    Starts from `resource_version` (default: a fresh read); when the server has
    compacted that version away (410 Gone) it re-lists and carries on.
    """
    job = _require_job(kube, name)
    kind = kind_of(job)
    state = job_state(job)
    out.write(f"{_now()} {name}: {state}\n")
    out.flush()
    rv = resource_version or job["metadata"]["resourceVersion"]
    deadline = None if timeout is None else time.monotonic() + timeout
    while state not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            return EXIT_NOT_FINISHED
        try:
            for event in kube.watch(*kind.api, name, rv, timeout=30):
                obj = {**event["object"], "kind": kind.kind}
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise UserError(f"watching {kind.resource_name}/{name} failed: {obj.get('message')}")
                if event["type"] == "DELETED":
                    raise UserError(f"{kind.resource_name}/{name} was deleted")
                rv = obj["metadata"]["resourceVersion"]
                new_state = job_state(obj)
                if new_state != state:
                    state = new_state
                    out.write(f"{_now()} {name}: {state}\n")
                    out.flush()
                if state in TERMINAL:
                    break
        except (_Gone, ApiError) as e:
            if isinstance(e, ApiError) and e.status != 410:
                raise
            out.write(f"{_now()} watch expired (410 Gone), re-listing\n")
            job = _require_job(kube, name)
            rv = job["metadata"]["resourceVersion"]
            if job_state(job) != state:
                state = job_state(job)
                out.write(f"{_now()} {name}: {state}\n")
    return TERMINAL[state]


class _Gone(Exception):
    pass


def _now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


# ---------------------------------------------------------------- logs
def logs(kube: Kube, name: str, follow: bool = False, rank: int | None = None,
         wait_seconds: float = 300, previous: bool = False, out: TextIO = sys.stdout) -> int:
    """Every replica's log, prefixed `[master-0]`/`[worker-1]`; waits for pending pods.

    With `follow`, it also waits for a job that is still being submitted; with
    `previous`, it shows the containers that ran before the kubelet restarted them.
    """
    deadline = time.monotonic() + wait_seconds
    job = find_job(kube, name)
    while job is None and follow and time.monotonic() < deadline:
        time.sleep(1)
        job = find_job(kube, name)
    job = job or _require_job(kube, name)
    kind = kind_of(job)
    nproc, expected = kind.procs_per_node(job), kind.nodes(job)
    while True:
        # The newest pod of each node (a Job keeps the pods it replaced).
        pods = list({kind.node_index(p): p for p in kube.pods(kind, name)}.values())
        if rank is not None:
            pods = [p for p in pods if kind.node_index(p) == rank // nproc]
        ready = [p for p in pods if _pod_status(p).get("phase") in ("Running", "Succeeded", "Failed")]
        wanted = 1 if rank is not None else expected
        if len(ready) >= wanted and ready:
            break
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{p['metadata']['name']} {_pod_status(p).get('phase')} "
                                f"{pending_reason(kube, p)}".strip()
                                for p in pods) or f"no pods yet (is {kind.operator} running?)"
            raise UserError(f"no logs after {wait_seconds:.0f}s: {waiting}")
        time.sleep(2)
    if previous:
        return _previous_logs(kube, kind, ready, out)
    lock = threading.Lock()
    threads = [threading.Thread(target=_stream_pod, args=(kube, kind, p, follow, out, lock), daemon=True)
               for p in ready]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def _stream_pod(kube: Kube, kind: JobKind, pod: dict, follow: bool, out: TextIO, lock: threading.Lock) -> None:
    """Stream one pod's trainer container; when following, pick up restarted containers."""
    prefix, name = f"[{kind.replica_prefix(pod)}] ", pod["metadata"]["name"]
    seen_restarts = -1
    while True:
        restarts = _restarts(pod)
        if restarts == seen_restarts:
            break
        seen_restarts = restarts
        if not follow:  # a snapshot: this pod's lines kept together, as `kubectl logs -l --prefix` prints them
            text = "".join(prefix + line + "\n" for line in whole_lines(kube.pod_log(name, kind.container)))
            with lock:
                out.write(text)
                out.flush()
            break
        for line in whole_lines(kube.pod_log(name, kind.container, follow=True)):
            with lock:
                out.write(prefix + line + "\n")
                out.flush()
        pod = kube.pod(name)
        if pod is None or _pod_status(pod).get("phase") in ("Succeeded", "Failed"):
            break


def whole_lines(chunks) -> Iterator[str]:
    """Lines from a byte stream whose chunks end anywhere (mid-line, mid-character)."""
    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        yield from (line.rstrip("\r") for line in lines)
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending.rstrip("\r")


def _previous_logs(kube: Kube, kind: JobKind, pods: list, out: TextIO) -> int:
    restarted = [p for p in pods if any(s.get("name") == kind.container and s.get("restartCount")
                                        for s in _pod_status(p).get("containerStatuses") or [])]
    if not restarted:
        raise UserError("no replica has restarted: there is no previous container to show "
                        "(the operator replaces pods under restartPolicy ExitCode; `kubetrain status` lists them)")
    for pod in restarted:
        prefix = f"[{kind.replica_prefix(pod)}] "
        text = b"".join(kube.pod_log(pod["metadata"]["name"], kind.container, previous=True))
        for line in text.decode("utf-8", errors="replace").splitlines():
            out.write(prefix + line + "\n")
    out.flush()
    return 0


# ---------------------------------------------------------------- list, delete
def list_experiments(kube: Kube, all_namespaces: bool = False, out: TextIO = sys.stdout) -> int:
    require_a_job_api(kube)
    jobs = [{**job, "kind": kind.kind} for kind in JOB_KINDS  # list items carry no kind
            for job in kube.list(*kind.api, selector="app.kubernetes.io/part-of=kubetrain",
                                 all_namespaces=all_namespaces)["items"]]
    rows = [("NAMESPACE", "NAME", "STATE", "NODES", "AGE", "KIND")]
    for job in sorted(jobs, key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"])):
        meta = job["metadata"]
        rows.append((meta.get("namespace", ""), meta["name"], job_state(job), str(kind_of(job).nodes(job)),
                     _age(meta.get("creationTimestamp")), job["kind"]))
    if not all_namespaces:
        rows = [row[1:] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    return 0


def delete(kube: Kube, name: str, out: TextIO = sys.stdout) -> int:
    """Delete what the experiment created (by its label) and its Helm release records, and nothing
    else: what `helm uninstall` removes, for a release installed by either."""
    removed = 0
    for api_version, kind in EXPERIMENT_KINDS:
        try:
            items = kube.list(api_version, kind, selector=experiment_selector(name))["items"]
        except (UserError, ApiError) as e:  # e.g. a Role without Secret access
            out.write(f"skipped {kind}: {e}\n")
            continue
        for item in items:
            if kube.delete(api_version, kind, item["metadata"]["name"]):
                out.write(f"{kind.lower()}/{item['metadata']['name']} deleted\n")
                removed += 1
    removed += _delete_release_records(kube, name, out)
    if not removed:
        require_a_job_api(kube)
        raise UserError(f"no experiment {name!r} in namespace {kube.namespace!r}")
    return 0


def _delete_release_records(kube: Kube, name: str, out: TextIO) -> int:
    """Helm's records of the release (labelled so by helm, where HELM_DRIVER keeps them): `helm list` agrees."""
    from trainer.controller.helm import release_store

    store, records = release_store(), []
    try:
        records = kube.list(*store, selector=f"owner=helm,name={name}")["items"] if store else []
        for record in records:
            kube.delete(*store, record["metadata"]["name"])
    except (UserError, ApiError) as e:
        out.write(f"skipped the release records ({store[1]}): {e}\n")
        return 0
    if records:
        out.write(f"release {name} removed ({len(records)} revisions kept by helm)\n")
    return len(records)
