"""FSDP checkpoints through torch.distributed.checkpoint (DCP), on any Store.

Under `training.parallelism: fsdp` no rank ever holds the whole model: each
rank writes its own shards (`__<rank>_0.distcp`) and rank 0 the global index
(`.metadata`), all below `step-<N>/dcp/`. Loading reshards, so a checkpoint
loads under another world size. The files go to the same store as the rest of
the step and join its commit protocol (checkpoint.py): commit.json lists them.

file:// stores: DCP's FileSystemWriter/Reader work in the step directory itself.
s3:// stores: each rank writes its files to a local temporary directory with
FileSystemWriter (TMPDIR needs room for this rank's shards) and uploads them
through the Store (multipart, retries); the reader downloads `.metadata`, then
only the shard files its load plan reads.

Safe loading. DCP stores its index as a pickle and FileSystemReader reads it
with plain `pickle.load`; `RestrictedMetadataUnpickler` replaces that with an
allowlist of DCP's own metadata classes and a few inert torch/pathlib values,
so a crafted `.metadata` cannot run code. Tensors are read with
`torch.load(weights_only=True)` by FileSystemReader; non-tensor values (the
optimizer's hyper-parameters) with weights_only=True by `SafeLoadPlanner`
(DefaultLoadPlanner uses weights_only=False there).
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CorruptCheckpoint, RetryableError, UserError
from trainer.storage import Store, file_sha256, hash_while

DCP_DIR = "dcp"
METADATA = ".metadata"
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")


def is_sharded(state: Any) -> bool:
    """Whether a state dict holds DTensors (FSDP's sharded parameters)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return True
    if isinstance(state, dict):
        return any(is_sharded(v) for v in state.values())
    return False


# ------------------------------------------------------------------ safe loading
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a torch.layout by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath", "PurePosixPath"},  # where Python 3.13 keeps them
    "collections": {"OrderedDict"},
}


class RestrictedMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index and nothing else: plain dataclasses and values."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")


def read_metadata_safely(path: Path, where: str):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = RestrictedMetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"refusing to load {where}: not a DCP index, it may be corrupt or crafted to run code "
                        f"when unpickled ({e})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"refusing to load {where}: it holds a {type(metadata).__name__}, not a DCP index")
    for info in (metadata.storage_data or {}).values():  # file names only: no path leaves dcp/
        if not SHARD_FILE.fullmatch(str(getattr(info, "relative_path", ""))):
            raise UserError(f"refusing to load {where}: it names a shard file "
                            f"{getattr(info, 'relative_path', None)!r} (expected __<rank>_<n>.distcp)")
    return metadata


def _safe_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner.load_bytes, but with weights_only=True (upstream passes False)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"refusing to load {fqn} from a DCP checkpoint: not plain data, it may be "
                                f"corrupt or crafted to run code when unpickled ({first})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafeLoadPlanner()


# ------------------------------------------------------------------ readers and writers over a Store
def _reader(store: Store, key: str, scratch: Path | None, sums: dict[str, str]):
    from torch.distributed.checkpoint import FileSystemReader

    class StoreReader(FileSystemReader):
        """FileSystemReader over the step's dcp/ directory; on S3, files come down as they are needed."""

        def __init__(self):
            super().__init__(store.local_path(key) or scratch)
            self.fetched: set[str] = set()
            self.nbytes = 0
            self.metadata = None

        def _fetch(self, name: str) -> Path:
            local = Path(self.path) / name
            if name not in self.fetched:
                if scratch is not None:
                    store.read_file(f"{key}/{name}", local)
                if name in sums and file_sha256(local) != sums[name]:
                    raise CorruptCheckpoint(f"{DCP_DIR}/{name} fails its SHA-256 check")
                self.fetched.add(name)
                self.nbytes += local.stat().st_size
            return local

        def checked_metadata(self):
            """The index, read through the restricted unpickler; called before dcp.load so a
            refusal is a clean UserError on every rank, not a failure inside DCP's collectives."""
            from torch.distributed.checkpoint.metadata import StorageMeta

            if self.metadata is None:
                self.metadata = read_metadata_safely(self._fetch(METADATA), store.url(f"{key}/{METADATA}"))
                self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()
                self.metadata.storage_meta.load_id = self.load_id
            return self.metadata

        def read_metadata(self, *args: Any, **kwargs: Any):
            return self.checked_metadata()

        def read_data(self, plan, planner):
            for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
                self._fetch(name)
            return super().read_data(plan, planner)

    return StoreReader()


def _first_failure(e) -> BaseException:
    """DCP wraps every rank's failure (with tracebacks) in one CheckpointException: the
    one that says most, ours (UserError, RetryableError) first, for a one-line message."""
    errors = [error for error, _ in e.failures.values()]
    ours = [error for error in errors if isinstance(error, (UserError, RetryableError))]
    return (ours or errors or [e])[0]


def save_sharded(store: Store, key: str, state: dict, group, rank: int) -> tuple[int, list[str], dict[str, str]]:
    """Every rank: write this rank's shards (and rank 0 the index) below `key`.

    Returns (bytes this rank wrote, every file name of the checkpoint below `key`, the SHA-256 of
    each file this rank wrote, from DCP's local copy as it goes up)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    local = store.local_path(key)
    scratch = None if local is not None else Path(tempfile.mkdtemp(prefix="kubetrain-dcp-"))
    try:
        try:
            metadata = dcp.save(state, storage_writer=dcp.FileSystemWriter(local or scratch),
                                process_group=group)
        except CheckpointException as e:
            raise _first_failure(e) from None
        names = sorted({info.relative_path for info in metadata.storage_data.values()} | {METADATA})
        mine = [name for name in names if name.startswith(f"__{rank}_") or (name == METADATA and rank == 0)]
        nbytes, sums = 0, {}
        for name in mine:
            path = (local or scratch) / name
            if scratch is None:  # DCP wrote into the store's own folder: nothing to upload
                sums[name] = file_sha256(path)
            else:
                sums[name], _ = hash_while(lambda: file_sha256(path),
                                           lambda: store.write_file(f"{key}/{name}", path))
            nbytes += path.stat().st_size
        return nbytes, names, sums
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def load_sharded(store: Store, key: str, state: dict, group, sums: dict[str, str] | None = None) -> int:
    """Every rank: fill `state` (a sharded state dict, in place) from the checkpoint below `key`,
    checking each file it reads against `sums` (name -> SHA-256) where the commit recorded them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    scratch = None if store.local_path(key) is not None else Path(tempfile.mkdtemp(prefix="kubetrain-dcp-"))
    reader = _reader(store, key, scratch, sums or {})
    try:
        reader.checked_metadata()
        try:
            dcp.load(state, storage_reader=reader, planner=_safe_load_planner(), process_group=group)
        except CheckpointException as e:
            raise _first_failure(e) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return reader.nbytes
