"""Sharded checkpoints from every rank (``train.checkpoint_format``): with FSDP2 each rank writes
the shards of the model and optimizer state it holds through torch.distributed.checkpoint (DCP),
instead of gathering them to rank 0; the directory format and its guarantees are gpt.dcp.

A save: every rank writes into ``.ckpt-STEP.dcp.tmp`` (``dcp.save`` of ``get_state_dict``'s sharded
state), hashes its own files, and the digests are gathered to rank 0, which writes ``meta.pt`` (the
rest of the checkpoint schema), the manifest last, renames the directory into place and prunes the
run's checkpoints to ``train.keep_last``. A load (resume, rollback, sample.py, export) goes through
gpt.checkpoint.load_checkpoint, which reads the tensors whole: any world size resumes it, FSDP2
keeping the shard of each tensor that is its own (gpt.train.distributed.load_optimizer_state).

    sharded = use_sharded(cfg.train, info, lora)
    save_sharded(out_dir, model, optimizer, meta_state, info, keep_last)   # on every rank
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt import dcp
from gpt.checkpoint import prune, save_checkpoint
from gpt.config import TrainConfig
from gpt.errors import ConfigError
from gpt.ranks import Ranks


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


def save_sharded(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any], info: Ranks, keep_last: int) -> Path:  # fmt: skip
    """Write the sharded checkpoint of ``meta["step"]`` (see the module docstring); call on every rank.
    ``meta`` is the checkpoint schema without weights (RunSetup.checkpoint_state(weights=False))."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    final = out_dir / dcp.sharded_name(int(meta["step"]))
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:  # saves cut short before (a run holds its out_dir alone: gpt.train.rundir's lock)
        for stale in [*out_dir.glob(f".ckpt-*{dcp.SUFFIX}.tmp"), *out_dir.glob(f".ckpt-*{dcp.SUFFIX}.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    info.barrier()
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        save(sharded_state(model, optimizer), storage_writer=FileSystemWriter(str(tmp), sync_files=True))
    digests = _gather_digests(tmp, info)
    if info.is_main:
        save_checkpoint(tmp / dcp.META, meta)  # format, version and checksum added: one schema
        for f in tmp.iterdir():  # DCP's .metadata, meta.pt: everything but the manifest
            if f.name not in digests and f.name != dcp.MANIFEST:
                digests[f.name] = dcp.file_digest(f)
        dcp.write_manifest(tmp, int(meta["step"]), info.world_size, digests)
        dcp.publish(tmp, final)
        prune(out_dir, keep_last)
    info.wait_all("rank 0 to publish the sharded checkpoint")
    return final
