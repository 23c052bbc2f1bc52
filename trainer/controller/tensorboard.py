"""`kubetrain tensorboard NAME`: serve an experiment's TensorBoard events.

The events of a local run are in its workdir; a cluster run's are under
`<checkpoint.uri>/<experiment>/tensorboard/` (trainer/worker/tensorboard.py).
A file:// location is served in place. TensorBoard cannot read an S3
endpoint of our choosing, so an s3:// one is copied to a local folder, and
kept up to date (new and grown files only) while TensorBoard runs.
"""

from __future__ import annotations

import collections
import errno
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from trainer.errors import UserError
from trainer.outputs import TENSORBOARD_DIR


class Mirror:
    """Copies a store's files below a prefix into a local folder, now and every `every` seconds."""

    def __init__(self, store, prefix: str, target: Path, every: float = 15.0):
        self.store, self.prefix, self.target, self.every = store, prefix, target, every
        self.copied: dict[str, int] = {}
        self.stopping = threading.Event()

    def sync(self) -> int:
        for key, size in self.store.sizes(self.prefix).items():
            if self.copied.get(key) == size:
                continue
            local = self.target / key[len(self.prefix):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".part")
            self.store.read_file(key, tmp)
            tmp.replace(local)  # TensorBoard never reads a half-copied file
            self.copied[key] = size
        return len(self.copied)

    def follow(self) -> None:
        def loop():
            while not self.stopping.wait(self.every):
                try:
                    self.sync()
                except Exception as e:  # keep serving what we have; say why it is not growing
                    print(f"warning: cannot refresh from {self.store.url(self.prefix)}: {e}", file=sys.stderr)

        threading.Thread(target=loop, name="tensorboard-mirror", daemon=True).start()


def event_folder(name: str, values: dict, workdir: Path, cache: Path) -> tuple[Path, str, Mirror | None]:
    """(folder to serve, where the events come from, the mirror that keeps it fresh or None)."""
    from trainer.config import S3Config, _build
    from trainer.storage import FileStore, open_store

    local = workdir / TENSORBOARD_DIR
    if local.is_dir():
        return local, str(local), None
    uri = values["checkpoint"]["uri"]
    if not uri:
        raise UserError(f"no TensorBoard events for {name!r}: {local} does not exist (no local run) and "
                        "checkpoint.uri is empty (a cluster run writes them under <checkpoint.uri>/NAME/tensorboard/)")
    store = open_store(uri, _build(S3Config, values["s3"]))
    prefix = f"{name}/{TENSORBOARD_DIR}"
    source = store.url(prefix)
    if isinstance(store, FileStore):  # served in place
        folder = store.root / prefix
        if not folder.is_dir():
            raise UserError(f"no TensorBoard events for {name!r} in {source}")
        return folder, source, None
    mirror = Mirror(store, prefix, cache / name)
    try:
        found = mirror.sync()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {source}: {e}") from None
    if not found:
        raise UserError(f"no TensorBoard events for {name!r} in {source} (has the job started?)")
    return cache / name, source, mirror


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on before starting TensorBoard: otherwise the readiness
    probe finds that program, prints a URL that points at it, and TensorBoard exits on its own."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TensorBoard's server sets it
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use by another program: pass --port with a free "
                            "port (--port 0 picks one)") from None
        raise UserError(f"cannot serve on {host}:{port}: {(e.strerror or str(e)).lower()}: "
                        "pass another --host or --port") from None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(name: str, values: dict, workdir: Path, cache: Path, host: str, port: int,
          ready_timeout: float = 60.0) -> int:
    folder, source, mirror = event_folder(name, values, workdir, cache)
    # Ctrl-C and SIGTERM stop it alike. Set explicitly: a process started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    if port:
        _check_port_free(host, port)
    port = port or _free_port(host)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", host,
               "--port", str(port), "--reload_interval", "5"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _listening(host, port):
            if proc.poll() is not None:
                raise UserError(f"tensorboard exited ({proc.returncode}) before serving: "
                                f"{proc.stderr.read().strip()[-500:]}")
            if time.monotonic() > deadline:
                raise UserError(f"tensorboard did not listen on {host}:{port} within {ready_timeout:.0f}s")
            time.sleep(0.2)
        if mirror is not None:
            mirror.follow()
        print(f"TensorBoard for {name} at http://{host}:{port}/ (events from {source}); Ctrl-C stops it",
              flush=True)
        last = collections.deque(maxlen=1)  # drained so TensorBoard never blocks on a full pipe
        drain = threading.Thread(target=lambda: last.extend(line.strip() for line in proc.stderr if line.strip()),
                                 daemon=True)
        drain.start()
        code = proc.wait()
        if code != 0:  # e.g. it lost the port to another program after all: say so, not exit silently
            drain.join(timeout=5)
            raise UserError(f"tensorboard exited ({code}) after it started serving on {host}:{port}"
                            + (f": {last[0][-300:]}" if last else ""))
        return 0
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    finally:
        if mirror is not None:
            mirror.stopping.set()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
