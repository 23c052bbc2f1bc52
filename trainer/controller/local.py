"""`kubetrain run`: the PyTorchJob (or TrainJob) as local processes, one per replica.

Each replica gets exactly the environment the Kubeflow training operator
injects (docs/architecture.md), or for `job.kind: TrainJob` what Kubeflow Trainer v2's
torch plugin injects (PET_* only, always under torchrun), with the master at
127.0.0.1 and a free port, plus the container's plain env (ncclEnv, env); torchrun
runs inside a replica when nprocPerNode > 1, as in the pod. Output is streamed
with a `[master-0]` / `[worker-1]` prefix. One failing replica stops the rest;
retryable exits (>= 128) relaunch every replica under `job.restartPolicy`
and `job.backoffLimit`, as the operator would.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from trainer.config import trainer_config_document, trainer_config_from_values
from trainer.controller.kinds import replica_name
from trainer.controller.checks import container_env, trainer_command
from trainer.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_STORAGE_UNAVAILABLE, UserError, is_retryable
from trainer.summary import MARKER, locate, to_json

STOP_GRACE_SECONDS = 30.0
# How long `kubetrain run` gives s3.endpoint to accept a connection before it starts anything. Pods retry
# an unreachable store for s3.retrySeconds (a preempted job's store may be restarting too); on this
# machine a refused connection means no server is running, which no restart mends.
ENDPOINT_CONNECT_SECONDS = 5.0
LOCK_FILE = "run.lock"  # in the workdir: flock'ed while a run (its runner or a replica) lives there


def _workdir_error(workdir: Path, error: OSError) -> UserError:
    """One line on why the run's folder cannot be made or written: a file in the way, else the OS's reason."""
    for path in (workdir, *workdir.parents):
        if path.exists():
            if path.is_dir():
                break
            where = "" if path == workdir else f", so {workdir} cannot be made under it"
            return UserError(f"workdir {workdir}: {path} is a file, not a directory{where}; "
                             "pass --workdir with a folder")
    where = "" if path == workdir else f" (it would be made in {path})"
    reason = (error.strerror or str(error)).lower()
    return UserError(f"workdir {workdir}: cannot write there{where}: {reason}; pass --workdir with a writable folder")


def lock_workdir(workdir: Path, experiment: str) -> int:
    """Make the workdir and hold an exclusive lock on it; the descriptor is returned and handed to the
    replicas, so the lock lasts while any of them lives and goes with the last of them (never stale).
    A second run there would share checkpoints and event files: it is refused, naming the first."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _workdir_error(workdir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]}, experiment {holder[1]!r}" if len(holder) == 2 else "a process starting now"
        raise UserError(f"workdir {workdir} is in use by another kubetrain run ({who}): two runs there would "
                        "share checkpoints and event files; wait for it, stop it, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {experiment}\n".encode(), 0)
    return fd


def default_workdir(experiment: str) -> Path:
    """Where `kubetrain run NAME` keeps its config and outputs unless --workdir says otherwise."""
    return (Path(".kubetrain") / "runs" / experiment).resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_v2_env(index: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What Kubeflow Trainer v2's torch plugin injects into node `index` of a TrainJob: PET_* only
    (torchrun, which a TrainJob always runs, derives every rank's RANK and WORLD_SIZE from them)."""
    return {
        "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(index),
        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1",
    }


def operator_env(index: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What the training operator injects into replica `index` (docs/architecture.md)."""
    return {
        "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
        "RANK": str(index), "PET_NODE_RANK": str(index),
        "WORLD_SIZE": str(nodes * nproc),
        "PET_NPROC_PER_NODE": str(nproc), "PET_NNODES": str(nodes),
        "PYTHONUNBUFFERED": "1",
    }


def _s3_uris(node) -> list[str]:
    if isinstance(node, dict):
        return [uri for value in node.values() for uri in _s3_uris(value)]
    if isinstance(node, list):
        return [uri for value in node for uri in _s3_uris(value)]
    return [node] if isinstance(node, str) and node.startswith("s3://") else []


def unreachable_endpoint(values: dict) -> str | None:
    """Why s3.endpoint takes no connection from this machine, when the run reads or writes s3:// URIs
    (checkpoint.uri, training.pretrained, data sources); None when it does, or when AWS serves them."""
    endpoint = values["s3"]["endpoint"]
    uris = _s3_uris({"checkpoint": values["checkpoint"], "training": values["training"]})
    if not endpoint or not uris:
        return None
    parsed = urlparse(endpoint)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=ENDPOINT_CONNECT_SECONDS):
            return None
    except ConnectionRefusedError:
        why = "connection refused: nothing listens there"
    except socket.gaierror:
        why = f"unknown host {parsed.hostname}"
    except TimeoutError:
        why = f"no connection within {ENDPOINT_CONNECT_SECONDS:g}s"
    except (OSError, ValueError) as e:
        why = str(e)
    return (f"s3.endpoint {endpoint} is unreachable ({why}); {uris[0]} needs it: start the S3 server "
            "or set s3.endpoint to one that answers")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the runner dies, so no replica outlives it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def shown(url: str) -> str:
    """A file:// URL as the path a person types; other URLs as they are."""
    parsed = urlparse(url)
    return unquote(parsed.path) if parsed.scheme == "file" else url


def exit_code(returncode: int) -> int:
    """A process killed by signal N exits 128+N, as a container does."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Attempt:
    """One launch of every replica; owns the processes and their output threads."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    summary: dict | None = None  # master-0's JSON summary line, when it printed one


class LocalRunner:
    def __init__(self, experiment: str, values: dict, workdir: Path, out=None, err=None):
        self.experiment, self.values, self.workdir = experiment, values, workdir
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.job = values["job"]
        self.print_lock = threading.Lock()
        self.stopping = False  # set by Ctrl-C/SIGTERM: no more restarts
        self.interrupted = False  # Ctrl-C: a person stopped it, so exit 130 as command-line tools do
        self.lock_fds: tuple[int, ...] = ()

    def write_config(self) -> Path:
        """The trainer config, written atomically: what the ConfigMap holds in a cluster."""
        trainer_config_from_values(self.experiment, self.values)  # fail on a bad name before writing
        path = self.workdir / "config.json"
        tmp = path.with_suffix(".tmp")
        document = {**trainer_config_document(self.experiment, self.values), "workdir": str(self.workdir)}
        try:
            tmp.write_text(json.dumps(document, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _workdir_error(self.workdir, e) from None
        return path

    def _emit(self, line: str) -> None:
        with self.print_lock:
            self.out.write(line)
            self.out.flush()

    def _pump(self, attempt: Attempt, index: int, stream) -> None:
        prefix = f"[{replica_name(index)}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if index == 0 and MARKER in line and (found := locate(line)) is not None:
                # The runner prints one summary, its own, at the end; keep any text glued around it.
                attempt.summary, start, end = found
                line = (line[:start] + line[end:]).strip()
                if not line:
                    continue
            self._emit(prefix + line if line.endswith("\n") else prefix + line + "\n")
        stream.close()

    def _launch(self, config_path: Path, restarts: int = 0) -> Attempt:
        nodes, nproc = self.job["nodes"], self.job["nprocPerNode"]
        port = free_port()
        threads_per_proc = max(1, (os.cpu_count() or 1) // (nodes * nproc))
        train_job = self.job["kind"] == "TrainJob"  # Trainer v2: PET_* only, always under torchrun
        attempt = Attempt()
        for index in range(nodes):
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(threads_per_proc))
            env.update(container_env(self.values))  # the chart's ncclEnv and env, as the pod has them
            env.update((trainer_v2_env if train_job else operator_env)(index, nodes, nproc, port))
            # Not from the operator: replicas share this host, so each gets its own /metrics ports.
            env.update({"KUBETRAIN_METRICS_PORT_OFFSET": str(index * nproc),
                        "KUBETRAIN_RESTART_COUNT": str(restarts)})
            proc = subprocess.Popen(
                trainer_command(self.values, str(config_path), python=sys.executable), env=env, cwd=self.workdir,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # our own signal forwarding reaches torchrun's children too
                preexec_fn=_die_with_parent, pass_fds=self.lock_fds,  # the workdir stays locked while it lives
            )
            attempt.procs.append(proc)
            t = threading.Thread(target=self._pump, args=(attempt, index, proc.stdout), daemon=True)
            t.start()
            attempt.threads.append(t)
        return attempt

    @staticmethod
    def _signal_all(attempt: Attempt, sig: int) -> None:
        for proc in attempt.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def _stop(self, attempt: Attempt) -> None:
        """SIGTERM every live replica (they checkpoint and exit), SIGKILL after a grace period."""
        self._signal_all(attempt, signal.SIGTERM)
        self._signal_all(attempt, signal.SIGCONT)  # a stopped (frozen) replica must run to see the SIGTERM
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in attempt.procs):
            time.sleep(0.1)
        self._signal_all(attempt, signal.SIGKILL)

    def _wait(self, attempt: Attempt) -> tuple[int, int | None]:
        """Wait for the attempt; returns (job exit code, index of the first failed replica)."""
        while True:
            for index, proc in enumerate(attempt.procs):
                code = proc.poll()
                if code is not None and code != 0:
                    self._stop(attempt)
                    return exit_code(code), index
            if all(p.poll() == 0 for p in attempt.procs):
                return 0, None
            time.sleep(0.1)

    def _should_restart(self, code: int, restarts: int) -> bool:
        policy = self.job["restartPolicy"]
        if self.stopping or code == 0 or restarts >= self.job["backoffLimit"]:
            return False
        return policy in ("Always", "OnFailure") or (policy == "ExitCode" and is_retryable(code))

    def run(self) -> int:
        self.lock_fds = (lock_workdir(self.workdir, self.experiment),)
        config_path = self.write_config()
        if not self.values["checkpoint"]["uri"]:
            self._emit(self._no_checkpoint_notice())
        restarts = 0
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        attempt_box: list[Attempt] = []

        def forward(signum, _frame):
            self.stopping = True
            if signum == signal.SIGINT and not self.interrupted:
                self.interrupted = True
                self._emit("[kubetrain] interrupted (Ctrl-C): every replica checkpoints and stops\n")
            if attempt_box:
                self._signal_all(attempt_box[-1], signal.SIGTERM)

        for sig in previous:
            signal.signal(sig, forward)
        try:
            while True:
                attempt = self._launch(config_path, restarts)
                attempt_box.append(attempt)
                code, failed = self._wait(attempt)
                for t in attempt.threads:
                    t.join(timeout=5)
                if not self._should_restart(code, restarts):
                    break
                if code == EXIT_STORAGE_UNAVAILABLE and (why := unreachable_endpoint(self.values)):
                    self._emit(f"[kubetrain] no restart: {why}\n")  # a restart would wait for it again
                    break
                restarts += 1
                reached = f", from the checkpoint of step {attempt.summary['steps']}" if (
                    attempt.summary and attempt.summary.get("checkpoint")) else ""
                self._emit(f"[kubetrain] {replica_name(failed or 0)} exited {code} (retryable): "
                           f"restart {restarts}/{self.job['backoffLimit']} of every replica{reached}\n")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        summary = self._final_summary(attempt, code, failed, restarts)
        self._emit("".join(f"[kubetrain] {line}\n" for line in self._where_it_went(summary)))
        self._emit(to_json(summary) + "\n")  # the last stdout line, the only summary
        if summary.get("error"):
            with self.print_lock:
                self.err.write(f"Error: {summary['error']}\n")
                self.err.flush()
        return summary.get("exit_code", code)

    def _no_checkpoint_notice(self) -> str:
        training = self.values["training"]
        kept = [what for what, on in (("the trained model", training["exportModel"]),
                                      ("TensorBoard events", training["tensorboard"]["enabled"])) if on]
        keep = (self.workdir / "checkpoints").as_uri()
        where = f"{' and '.join(kept)} go to {self.workdir}, but " if kept else ""
        return (f"[kubetrain] checkpoint.uri is not set: {where}no checkpoint is kept, so a rerun starts from "
                f"step 0; --set checkpoint.uri={keep} keeps checkpoints (and a rerun resumes)\n")

    def _where_it_went(self, summary: dict) -> list[str]:
        """A few lines for a person: where the run's model, curves and checkpoint are."""
        lines = []
        for key in ("model", "adapter"):
            if summary.get(key):
                lines.append(f"{key + ':':<13}{shown(summary[key])}")
        if summary.get("tensorboard"):
            flag = "" if self.workdir == default_workdir(self.experiment) else f" --workdir {self.workdir}"
            lines.append(f"{'tensorboard:':<13}kubetrain tensorboard {self.experiment}{flag}")
        if summary.get("checkpoint"):
            lines.append(f"{'checkpoint:':<13}{shown(summary['checkpoint'])} (a rerun resumes from it)")
        elif not self.values["checkpoint"]["uri"]:
            lines.append(f"{'checkpoint:':<13}none (checkpoint.uri is not set)")
        return lines

    def _final_summary(self, attempt: Attempt, code: int, failed: int | None, restarts: int) -> dict:
        summary = dict(attempt.summary or {
            "event": "summary", "experiment": self.experiment, "steps": 0, "train_loss": None,
            "eval_loss": None, "eval_accuracy": None, "samples_per_second": 0.0,
            "wall_seconds": 0.0, "checkpoint": None,
        })
        if code == 0:
            summary["status"] = "succeeded"
        elif self.interrupted and code == EXIT_PREEMPTED:  # the replicas checkpointed as on SIGTERM
            summary.update(status="interrupted", exit_code=EXIT_INTERRUPTED)
        else:
            summary["status"] = "preempted" if code == EXIT_PREEMPTED else "failed"
            summary["exit_code"] = code
            summary["failed_replica"] = replica_name(failed or 0)
        summary["restarts"] = restarts
        return summary
