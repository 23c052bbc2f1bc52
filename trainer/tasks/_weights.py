"""Pretrained weights from a URI (`file://`, `s3://`), for clusters without internet.

A `WeightsReader` reads through the checkpoint store (trainer/storage.py)
with the S3 settings it is given (endpoint, region, addressing style), so
credentials work the same as for checkpoints. The Trainer makes one from the
run's `s3` section and passes it to the task's builder. Loading never unpickles
arbitrary objects: `.safetensors`, or `torch.load(weights_only=True)` for
`.pt`/`.pth`/`.bin`.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import torch

from trainer.errors import UserError
from trainer.hub import WEIGHTS_CACHE_ENV, weights_cache

log = logging.getLogger(__name__)

CACHE_ENV = WEIGHTS_CACHE_ENV
CACHE_MARKER = ".kubetrain-fetched.json"  # {file: size}, written last: a folder without it is partial


def _fetch_hub(uri: str, key: str, folder: Path) -> Path:
    """hf://org/name[@revision] through huggingface_hub (its own cache and checks), into `folder`."""
    repo, _, revision = uri[len("hf://"):].partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision or None, cache_dir=str(folder)))
    except ImportError:
        raise UserError(f"{key}: hf:// needs the huggingface_hub package (pip install 'kubetrain[nlp]')") from None
    except Exception as e:  # no network, unknown repo, gated model without HF_TOKEN
        raise UserError(f"{key}: cannot download {uri!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}); offline, upload the folder to S3 and use s3://") from None


def _split(uri: str, key: str) -> tuple[str, str]:
    """('scheme://bucket-or-dir', 'name') for a file URI."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", "s3"):
        raise UserError(f"{key}: {uri!r} must be a file:// or s3:// URI")
    path = PurePosixPath(unquote(parsed.path))
    if parsed.scheme == "file":
        return f"file://{path.parent}", path.name
    return f"s3://{parsed.netloc}{path.parent}".rstrip("/"), path.name


class WeightsReader:
    """Weights files and folders from file:// and s3:// URIs, read with one run's S3 settings."""

    def __init__(self, s3_config=None):
        self.s3_config = s3_config  # an S3Config; None: boto3's defaults (AWS, AWS_* variables)
        self.applied: set[str] = set()  # URIs load_pretrained() loaded through this reader

    def _store(self, base: str):
        from trainer.storage import open_store

        return open_store(base, self.s3_config)

    def fetch_file(self, uri: str, key: str, workdir: Path) -> Path:
        """A local path holding the object at `uri` (file:// is used in place)."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if not path.is_file():
                raise UserError(f"{key}: {uri!r}: no such file")
            return path
        base, name = _split(uri, key)
        target = workdir / name
        try:
            self._store(base).read_file(name, target)
        except UserError:
            raise
        except Exception as e:  # botocore's NoSuchKey and friends
            raise UserError(f"{key}: cannot read {uri!r}: {e}") from None
        return target

    def fetch_directory(self, uri: str, key: str) -> Path:
        """A local directory with the files below `uri` (a Hugging Face model folder).

        file:// is used in place. s3:// and hf:// are fetched once per node-local cache folder
        (`$KUBETRAIN_WEIGHTS_CACHE`, else kubetrain-weights/ in the temp dir: the pod's /tmp, shared
        by its processes): the first process to take the folder's lock downloads, the others wait
        on the lock and then read the same files. A cached copy is reused while every file has
        the size the source lists; otherwise it is fetched again."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if not path.is_dir():
                raise UserError(f"{key}: {uri!r}: no such directory")
            return path
        if parsed.scheme not in ("s3", "hf"):
            raise UserError(f"{key}: {uri!r} must be a file://, s3:// or hf:// URI, or a model name")
        folder = weights_cache(uri)
        root = folder.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            with open(root / f"{folder.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                if parsed.scheme == "hf":
                    return _fetch_hub(uri, key, folder)
                return self._fetch_s3_folder(uri, key, folder)
        except OSError as e:
            raise UserError(f"{key}: cannot cache {uri!r} in {root} ({e}); set {CACHE_ENV} to a writable "
                            "folder") from None

    def _fetch_s3_folder(self, uri: str, key: str, folder: Path) -> Path:
        parsed = urlparse(uri)
        store = self._store(f"s3://{parsed.netloc}")
        prefix = unquote(parsed.path).strip("/")
        try:
            sizes = {str(PurePosixPath(k).relative_to(prefix)): n for k, n in store.sizes(prefix).items()}
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{key}: cannot list {uri!r}: {e}") from None
        if not sizes:
            raise UserError(f"{key}: {uri!r} holds no files")
        marker = folder / CACHE_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == sizes and all(
                (folder / name).is_file() and (folder / name).stat().st_size == n for name, n in sizes.items()):
            log.info("%s: %s already in the node's cache %s", key, uri, folder)
            return folder
        started = time.perf_counter()
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for name, size in sizes.items():
                local = partial / name
                local.parent.mkdir(parents=True, exist_ok=True)
                store.read_file(f"{prefix}/{name}", local)
                if local.stat().st_size != size:
                    raise UserError(f"{key}: {uri}/{name}: {local.stat().st_size} bytes arrived, the listing "
                                    f"says {size}")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{key}: cannot read {uri!r}: {e}") from None
        (partial / CACHE_MARKER).write_text(json.dumps(sizes))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        log.info("%s: fetched %s (%d files, %.1f MB) into %s in %.1fs", key, uri, len(sizes),
                 sum(sizes.values()) / 1e6, folder, time.perf_counter() - started)
        return folder

    def load_state_dict(self, uri: str, key: str = "training.pretrained") -> dict[str, torch.Tensor]:
        """A state dict from a weights file; a checkpoint-style {"model": {...}} is unwrapped."""
        with tempfile.TemporaryDirectory(prefix="kubetrain-weights-") as tmp:
            path = self.fetch_file(uri, key, Path(tmp))
            try:
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{key}: {uri!r} is not a weights file (.pt state dict or .safetensors): "
                                f"{type(e).__name__}: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{key}: {uri!r} does not hold a state dict of tensors")
        log.info("loaded %d tensors from %s", len(state), uri)
        return state


# The reader of the run whose custom entry point is being called, for the public helpers
# (trainer.tasks.load_weights/load_pretrained) that a user's entry point calls without one.
_entrypoint_reader: contextvars.ContextVar[WeightsReader | None] = contextvars.ContextVar(
    "kubetrain_entrypoint_weights", default=None)


@contextlib.contextmanager
def reading_with(reader: WeightsReader):
    """While a custom entry point runs: the public helpers read with this run's reader."""
    token = _entrypoint_reader.set(reader)
    try:
        yield reader
    finally:
        _entrypoint_reader.reset(token)


def current_reader(reader: WeightsReader | None = None, s3_config=None) -> WeightsReader:
    """The reader to use: the one given, one for `s3_config`, the calling run's (inside a custom entry
    point), else boto3's defaults (a builder called without the Trainer, as tests and scripts do)."""
    if reader is not None:
        return reader
    if s3_config is not None:
        return WeightsReader(s3_config)
    return _entrypoint_reader.get() or WeightsReader()


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor], uri: str, key: str) -> dict[str, list[str]]:
    """Copy the tensors of `state` whose name and shape match into `model`; report the rest."""
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    reshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if not loaded:
        raise UserError(f"{key}: {uri!r} has no tensor whose name and shape match the model's "
                        f"(file: {_few(sorted(state), 3)}; model: {_few(sorted(own), 3)})")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    log.info("%s: loaded %d of the model's %d tensors from %s%s%s%s", key, len(loaded), len(own), uri,
             f"; skipped, shape differs: {_few(reshaped)}" if reshaped else "",
             f"; skipped, not in the model: {_few(unknown)}" if unknown else "",
             f"; not in the file, kept as initialised: {_few(missing)}" if missing else "")
    return {"loaded": loaded, "skipped": reshaped + unknown, "missing": missing}


def _few(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
