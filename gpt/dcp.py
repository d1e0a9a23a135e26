"""Sharded checkpoint directories (torch.distributed.checkpoint, DCP): the on-disk format and its
guarantees; writing one from FSDP2 ranks and resuming one are gpt.train.sharded, reading one whole
is gpt.checkpoint.

A sharded checkpoint is a directory ``ckpt-STEP.dcp`` beside (or instead of) ``ckpt.pt``:

    .metadata, __R_I.distcp   DCP's files: the model's and the optimizer's tensors, each rank's shards
    meta.pt                   everything else of the one checkpoint schema (gpt.checkpoint), with its
                              own checksum: model_config, tokenizer, step, rng, config, guard, ...
    manifest.json             written last, atomically: {"format": "gpt-dcp", "version": 1, "step": N,
                              "world_size": W, "files": {name: sha256}}

A directory without its manifest, or whose files do not match it, is never taken as a checkpoint
(a save cut short, a damaged shard): one CheckpointError line. The ranks write into
``.ckpt-STEP.dcp.tmp`` and rank 0 renames it into place once the manifest is in: a reader never sees
a half-written directory under the checkpoint's name. DCP's ``.metadata`` is a pickle: it is read with
an unpickler that builds only DCP's metadata classes and torch's sizes and dtypes (no other object),
and tensors are read without any process group, so one process (sample.py, export) reads a
checkpoint written by any number of ranks, whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from gpt.atomic import atomic_write
from gpt.errors import CheckpointError

FORMAT = "gpt-dcp"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.pt"
SUFFIX = ".dcp"
# what DCP's .metadata pickle may build: the classes defined in its metadata modules, torch's sizes,
# dtypes and layouts, paths (where it was written); no function, no other object
_SAFE = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"}  # dataclasses
_SAFE_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "PureWindowsPath")}  # fmt: skip


def sharded_name(step: int) -> str:
    return f"ckpt-{step:07d}{SUFFIX}"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` names a sharded checkpoint directory (complete or not)."""
    p = Path(path)
    return p.suffix == SUFFIX and p.is_dir()


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB pieces (a shard may be larger than memory allows at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, step: int, world_size: int, digests: dict[str, str]) -> None:
    """The last file of a save: what the directory must hold, byte for byte."""
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "files": dict(sorted(digests.items()))}  # fmt: skip
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The manifest of a complete, undamaged sharded checkpoint, or CheckpointError saying what is wrong.
    ``share=(rank, world)``: every file must be there, but only every world-th is hashed, from ``rank``
    (the ranks of a job share the reading, then agree: gpt.train.sharded)."""
    advice = "the save was cut short or a file was changed; use an older checkpoint or train again"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint {directory} has no {MANIFEST}: {advice}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / MANIFEST} is unreadable ({type(e).__name__}): {advice}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
        manifest.get("files"), dict
    ):
        raise CheckpointError(f"{directory / MANIFEST} is not a gpt sharded-checkpoint manifest: {advice}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{directory} has sharded-checkpoint version {manifest.get('version')}, this code reads {VERSION}"
        )
    for i, (name, digest) in enumerate(sorted(manifest["files"].items())):
        file = directory / name
        if Path(name).name != name or not file.is_file():
            raise CheckpointError(f"sharded checkpoint {directory} lacks {name}: {advice}")
        if i % share[1] == share[0] and file_digest(file) != digest:
            raise CheckpointError(f"sharded checkpoint {directory} is damaged: {name} does not match its "
                                  f"checksum in {MANIFEST}; {advice}")  # fmt: skip
    if META not in manifest["files"] or ".metadata" not in manifest["files"]:
        raise CheckpointError(f"sharded checkpoint {directory} lacks {META} or .metadata: {advice}")
    return manifest


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes only: never an arbitrary object."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _SAFE_NAMES:
            return super().find_class(module, name)
        if module in _SAFE and "." not in name:  # a class defined there (a dotted name could reach anything)
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def _reader(directory: Path):
    """A DCP FileSystemReader whose ``.metadata`` is read with the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.bytes_read: dict[str, int] = {}  # file name -> bytes this process read from it

        def read_data(self, plan, planner):  # each read item is one stored slice, read whole
            for item in plan.items:
                info = self.storage_data[item.storage_index]
                self.bytes_read[info.relative_path] = self.bytes_read.get(info.relative_path, 0) + info.length
            return super().read_data(plan, planner)

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = Path(self._get_metadata_path(kwargs.get("rank")))  # .metadata, or a rank's own
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _cause(e: BaseException) -> str:
    """The line of a DCP error that says what failed (DCP wraps each rank's error in its own text)."""
    causes = [line for line in str(e).splitlines() if "Error:" in line]
    return (causes or str(e).strip().splitlines() or [type(e).__name__])[-1].strip()[:200]


def read_tensors(directory: Path) -> dict[str, Any]:
    """Every entry of a (verified) sharded checkpoint's DCP part, whole, in this process alone:
    {"model": {name: tensor}, "optimizer": {"state": ..., "param_groups": ...}} as saved.
    Non-tensor entries are read by DCP with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=_reader(directory), no_dist=True,
                         planner=_EmptyStateDictLoadPlanner())  # fmt: skip
    except (Exception, CheckpointException) as e:  # (a BaseException) a forged manifest, pickle, ...
        raise CheckpointError(f"sharded checkpoint {directory} cannot be read ({_cause(e)}); use an older "
                              "checkpoint or train again") from None  # fmt: skip
    return state


def saved_keys(directory: Path) -> set[str]:
    """The flattened keys of a sharded checkpoint's DCP part: ``model.NAME``,
    ``optimizer.state.NAME.exp_avg``, ..."""
    return set(_reader(directory).read_metadata().state_dict_metadata)


def load_into(directory: Path, state: dict[str, Any]) -> dict[str, int]:
    """Fill ``state`` in place from a verified sharded checkpoint, with DCP on every rank of the
    process group (or this process alone without one): ``state`` holds this process's own tensors
    (FSDP2's DTensor shards, or whole tensors), and only the stored slices that overlap them are read.
    Returns the bytes this process read per file."""
    import warnings

    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _reader(directory)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it loads without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            load(state, storage_reader=reader)
    except (Exception, CheckpointException) as e:  # every rank raises when one failed (DCP gathers)
        raise CheckpointError(f"sharded checkpoint {directory} cannot be loaded into this run ({_cause(e)}); "
                              "resume with the settings it was trained with") from None  # fmt: skip
    return reader.bytes_read


def publish(tmp: Path, final: Path) -> None:
    """Move a complete ``tmp`` directory to ``final``; an existing ``final`` (the same step saved again,
    after a rollback) is moved aside first and removed after, so a complete one is there throughout
    but for the instant between two renames."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
