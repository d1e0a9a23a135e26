"""Sharded checkpoints from every rank (``train.checkpoint_format``): with FSDP2 each rank writes
the shards of the model and optimizer state it holds through torch.distributed.checkpoint (DCP),
instead of gathering them to rank 0; the directory format and its guarantees are gpt.dcp.

A save: every rank writes into ``.ckpt-STEP.dcp.tmp`` (``dcp.save`` of ``get_state_dict``'s sharded
state), hashes its own files, and the digests are gathered to rank 0, which writes ``meta.pt`` (the
rest of the checkpoint schema), the manifest last, renames the directory into place and prunes the
run's checkpoints to ``train.keep_last``.

A resume (``resume_point``) verifies the newest checkpoint against its manifest, the ranks sharing
the hashing (passing over a damaged one to the previous), and reads only its ``meta.pt``; once the
model is wrapped (FSDP2, DDP or none), ``load_sharded`` fills the model's and optimizer's own state
dicts with ``dcp.load``: each rank reads the stored slices that overlap its shards, at any world size.
A sharded run's rollback goes the same way; sample.py and export read a checkpoint whole through
gpt.checkpoint.load_checkpoint.

    sharded = use_sharded(cfg.train, info, lora)
    save_sharded(out_dir, model, optimizer, meta_state, info, keep_last)   # on every rank
    loaded = resume_point(out_dir, warn, info)      # weights None when a sharded directory
    read = load_sharded(Path(loaded.source), model, optimizer)   # after wrapping, on every rank
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt import dcp
from gpt.checkpoint import history, load_checkpoint, prune, save_checkpoint
from gpt.config import TrainConfig
from gpt.errors import CheckpointError, ConfigError
from gpt.model import GPTConfig
from gpt.ranks import Ranks
from gpt.runs.load import Loaded, load
from gpt.tokenizer_load import tokenizer_from_state


def use_sharded(train_cfg: TrainConfig, info: Ranks, lora: dict[str, Any] | None) -> bool:
    """Whether this run writes sharded checkpoints: ``train.checkpoint_format=sharded``, or ``auto``
    under FSDP2 with more than one rank. A LoRA run's checkpoint holds only its small adapters: one file."""
    fmt = train_cfg.checkpoint_format
    if fmt == "sharded" and lora is not None:
        raise ConfigError(
            "train.checkpoint_format=sharded: a LoRA run saves only its adapters, as one file; "
            "use train.checkpoint_format=auto or single"
        )
    return fmt == "sharded" or (fmt == "auto" and train_cfg.parallel == "fsdp" and info.world_size > 1
                                and lora is None)  # fmt: skip


def non_finite_local(model: torch.nn.Module) -> list[str]:
    """Parameters whose part held by this rank (a DTensor's local shard) holds a NaN or an infinity."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards: {"model": name -> DTensor, "optimizer": name-keyed state} (no optimizer
    state before the first step: get_state_dict would create it, changing the run)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def _gather_digests(tmp: Path, info: Ranks) -> dict[str, str]:
    """Every rank hashes the files it wrote (``__RANK_*.distcp``: the reading is shared); rank 0 gets
    all the digests (the others an empty dict)."""
    mine = {f.name: dcp.file_digest(f) for f in sorted(tmp.glob(f"__{info.rank}_*"))}
    every: list[Any] = [mine]
    if info.enabled:
        every = [None] * info.world_size
        dist.all_gather_object(every, mine, group=info.control)
    return {k: v for d in every for k, v in d.items()} if info.is_main else {}


@dataclass
class SaveInFlight:
    """A sharded save whose files a background thread is still writing (train.async_checkpoint):
    ``finish()``, on every rank, waits for them and publishes the checkpoint (manifest, rename, prune)."""

    written: Any  # DCP's future of the write
    tmp: Path
    final: Path
    meta: dict[str, Any]
    info: Ranks
    keep_last: int

    def finish(self) -> Path:
        self.written.result()  # raises on every rank when a rank's write failed (DCP gathers the errors)
        return _publish(self.tmp, self.final, self.meta, self.info, self.keep_last)


def checkpoint_group(info: Ranks) -> Any:
    """A gloo process group of the job's ranks for background saves alone: DCP's collectives from the
    writing thread may not interleave with the training's (FSDP2's, the per-step agreements) on the
    same group. None in a single process. Call on every rank."""
    return dist.new_group(backend="gloo", timeout=dist.default_pg_timeout) if info.enabled else None


def save_sharded(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any], info: Ranks, keep_last: int, background: bool = False,
                 group: Any = None) -> Path | SaveInFlight:  # fmt: skip
    """Write the sharded checkpoint of ``meta["step"]`` (see the module docstring); call on every rank.
    ``meta`` is the checkpoint schema without weights (RunSetup.checkpoint_state(weights=False)).
    ``background``: this rank's shards are copied to CPU memory now and written by a thread, over
    ``group`` (checkpoint_group); the SaveInFlight returned publishes them once written."""
    from torch.distributed.checkpoint import FileSystemWriter, async_save, save

    final = out_dir / dcp.sharded_name(int(meta["step"]))
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:  # saves cut short before (a run holds its out_dir alone: gpt.train.rundir's lock)
        for stale in [*out_dir.glob(f".ckpt-*{dcp.SUFFIX}.tmp"), *out_dir.glob(f".ckpt-*{dcp.SUFFIX}.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    info.barrier()
    writer = FileSystemWriter(str(tmp), sync_files=True)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        if background:
            written = async_save(sharded_state(model, optimizer), storage_writer=writer, process_group=group,
                                 no_dist=not dist.is_initialized())  # fmt: skip
            return SaveInFlight(written, tmp, final, meta, info, keep_last)
        save(sharded_state(model, optimizer), storage_writer=writer)
    return _publish(tmp, final, meta, info, keep_last)


def _publish(tmp: Path, final: Path, meta: dict[str, Any], info: Ranks, keep_last: int) -> Path:
    """After every rank wrote its files into ``tmp``: digests to rank 0, which writes meta.pt and the
    manifest, renames ``tmp`` to ``final`` and prunes; the other ranks wait for it."""
    digests = _gather_digests(tmp, info)
    if info.is_main:
        save_checkpoint(tmp / dcp.META, meta)  # format, version and checksum added: one schema
        for f in tmp.iterdir():  # DCP's .metadata, meta.pt: everything but the manifest
            if f.name not in digests and f.name != dcp.MANIFEST:
                digests[f.name] = dcp.file_digest(f)
        dcp.write_manifest(tmp, int(meta["step"]), info.world_size, digests)
        dcp.publish(tmp, final)
        prune(final.parent, keep_last)
    info.wait_all("rank 0 to publish the sharded checkpoint")
    return final


def _verify_shared(directory: Path, info: Ranks) -> None:
    """dcp.verify with the hashing shared between the ranks (rank r hashes every W-th file: the job
    reads the checkpoint once, not once per rank); every rank raises the first error any rank found."""
    error = None
    try:
        dcp.verify(directory, share=(info.rank, info.world_size))
    except CheckpointError as e:
        error = str(e)
    if info.enabled:
        every: list[Any] = [None] * info.world_size
        dist.all_gather_object(every, error, group=info.control)
        error = next((e for e in every if e), None)
    if error:
        raise CheckpointError(error)


def resume_point(out_dir: Path, warn: Callable[[str], Any], info: Ranks) -> Loaded:
    """What ``resume=true`` starts from: the newest checkpoint of ``out_dir`` that verifies, each damaged
    one passed over being reported through ``warn``. A file is read whole by the one loader; of a sharded
    directory only the manifest's check (shared by the ranks; call on every rank) and ``meta.pt`` (its
    ``weights`` are None: load_sharded reads the tensors into the wrapped model). Raises the newest
    one's error if none verifies."""
    first: CheckpointError | None = None
    for path in history(out_dir):
        try:
            if not dcp.is_sharded(path):
                return load(path)
            _verify_shared(path, info)
            state = load_checkpoint(path / dcp.META)
        except CheckpointError as e:
            first = first or e
            warn(f"warning: {e}; trying the previous checkpoint")
            continue
        config = GPTConfig.from_dict(dict(state["model_config"]))
        tokenizer = tokenizer_from_state(state["tokenizer"])
        return Loaded(config, None, tokenizer, str(path), out_dir.resolve().name, state)  # type: ignore[arg-type]
    if first is not None:
        raise first
    return load(out_dir)  # no checkpoint: the loader's one line


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Load a verified sharded checkpoint into ``model`` (wrapped or not) and its ``optimizer``, on
    every rank: their own state dicts (get_state_dict: DTensor shards under FSDP2) are filled by
    ``dcp.load`` and set back. A checkpoint saved before the first step has no optimizer state (the
    optimizer's is cleared: fresh). Returns the bytes this rank read per file."""
    from torch.distributed.checkpoint import state_dict as dsd

    state: dict[str, Any] = {"model": dsd.get_model_state_dict(model)}
    with_optimizer = any(k.startswith("optimizer.") for k in dcp.saved_keys(directory))
    if with_optimizer:  # creates the optimizer's state (a zero step at lr 0) for DCP to fill
        state["optimizer"] = dsd.get_optimizer_state_dict(model, optimizer)
    read = dcp.load_into(directory, state)
    dsd.set_model_state_dict(model, state["model"])
    if with_optimizer:
        dsd.set_optimizer_state_dict(model, optimizer, state["optimizer"])
    else:
        optimizer.state.clear()
    return read
