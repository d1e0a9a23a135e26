"""Training across processes: joining the process group (a ``gpt.ranks.Ranks``, whose methods are
the agreements between ranks: stop flags, token counts), teardown, rank-0 printing, device per
local rank, which part of a global batch a rank reads, wrapping the model for data parallelism
(DDP or FSDP2) from the outside, and checkpoint state in the one layout every world size reads.

A single ``python train.py`` is world size 1 and starts no process group; under
``torchrun --nproc_per_node=N train.py ...`` (or one torchrun per node with a c10d rendezvous, as
in scripts/slurm_train.sh) the usual environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) select the process group: NCCL on CUDA, gloo on CPU.

    info = init_distributed("auto", timeout_s=1800)   # in gpt.train.loop.train; teardown() at the end
    model = prepare_model(model, info, cfg.train, dtype)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gpt.device import pick_device
from gpt.errors import CheckpointError, ConfigError
from gpt.ranks import Ranks


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> Ranks:
    """Join the process group when launched by torchrun; otherwise a world of one. ``timeout_s``
    bounds every collective: a rank that stops answering fails the job instead of hanging it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "mps":
        raise ConfigError(
            "multi-process training runs on CUDA (NCCL) or the CPU (gloo); use device=cuda or cpu"
        )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None
        )
    # host-side agreements (stop flags, token counts) go over gloo: no GPU synchronisation per step
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks share the machine's cores: a share each avoids oversubscription (an explicit
        # OMP_NUM_THREADS, which torchrun sets to 1 for several processes per node, is kept)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return Ranks(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, control=control)


def teardown() -> None:
    """Leave the process group (also after an error, so that no peer waits on this rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, in place (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def print0(*args, info: Ranks | None = None, **kwargs) -> None:
    """Print on rank 0 only (to stderr unless told otherwise)."""
    if info is not None and not info.is_main:
        return
    if info is None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    kwargs.setdefault("file", sys.stderr)
    print(*args, **kwargs, flush=True)


def micro_batch_starts(batch_size: int, micro_batch_size: int, info: Ranks) -> list[int]:
    """First global-batch position of each of this rank's micro-batches. Rank r reads the
    contiguous slice [r * B/W, (r+1) * B/W) of the global batch of B sequences, so ranks never
    share a position and the union over ranks is the batch a single process would read."""
    per_rank = batch_size // info.world_size
    return list(range(info.rank * per_rank, (info.rank + 1) * per_rank, micro_batch_size))


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _pass_through(state, bucket):  # DDP checks hook annotations against its classes: none (strings here)
    """A DDP communication hook that keeps each bucket's gradients: a dry run's fake process group
    moves no data (and its all-reduce returns nothing DDP could take)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def wrap_model(model: torch.nn.Module, info: Ranks, parallel: str, mixed_dtype: torch.dtype | None,
               fake: bool = False):  # fmt: skip
    """Apply data parallelism to ``model`` from the outside; returns the module to train.
    DDP replicates the weights; FSDP2 (``fully_shard``) shards them per block and at the root.
    ``fake``: a dry run's fake tensors (gpt.train.dry_run): DDP neither compares nor broadcasts the
    weights at start (there are none), and its buckets keep their gradients."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # the model's only buffers are constant RoPE tables, the same on every rank: no broadcast
        ddp = DDP(model, device_ids=ids, broadcast_buffers=False, init_sync=not fake)
        if fake:
            ddp.register_comm_hook(None, _pass_through)
        return ddp
    if mixed_dtype == torch.float16:
        # the GradScaler's inf check would be per shard: ranks could disagree on skipping a step
        raise ConfigError(
            "train.parallel=fsdp does not support train.dtype=fp16; use bf16, fp32 or parallel=ddp"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32) if mixed_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the rest: embeddings, final norm, (tied) head
    return model


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one communicates."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2: no reduce-scatter, unsharded grads kept
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them: memory
    per block drops to its input, at the price of one more forward. Patches ``forward`` on the
    instances, so parameter names (and checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        inner = block.forward
        block.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def prepare_model(model: torch.nn.Module, info: Ranks, train_cfg, dtype: torch.dtype) -> torch.nn.Module:
    """Move to the device, then apply activation checkpointing and data parallelism from outside."""
    model.to(info.device)
    if train_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return wrap_model(model, info, train_cfg.parallel, dtype if dtype != torch.float32 else None)


# --------------------------------------------------------------------------------- checkpoint state
# One layout for every world size: full (unsharded) CPU tensors, the optimizer state keyed by
# parameter name (torch.distributed.checkpoint.state_dict), so a checkpoint written by N ranks with
# DDP or FSDP is resumed by M ranks or one process, and loaded by sample.py, without conversion.


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: Ranks
) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, complete on rank 0. Call it on every rank: FSDP2 gathers the
    shards to rank 0; with DDP or one process the other ranks skip the copy (and get empty dicts).
    ``model`` is the unwrapped module (not DDP, not compiled)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if not info.is_main and not is_fsdp(model):
        return {}, {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer.state:
        # before the first step: get_state_dict would initialise AdamW's state (step=1) on this rank
        # only, silently changing the run; there is no optimizer state to save yet anyway
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (every rank holds it) into a plain or FSDP2 model's
    optimizer; FSDP2 keeps the shard of each tensor that belongs to this rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state or not state.get("state"):  # saved before the first optimizer step: nothing to load
        return
    saved, have = len(state.get("param_groups", [])), len(optimizer.param_groups)
    if saved and saved != have:  # e.g. an AdamW run resumed with optim=muon (or the other way)
        raise CheckpointError(
            f"the checkpoint's optimizer state has {saved} parameter groups, this run's optimizer {have}: "
            "resume with the optimizer the run was trained with (optim=adamw or optim=muon), or start a "
            "new run from its weights with init_from"
        )
    if any(isinstance(k, int) for k in state.get("state", {})):  # written before names were used
        if is_fsdp(model):
            raise CheckpointError(
                "this checkpoint's optimizer state is indexed by position (an older format) and cannot be "
                "sharded; resume it once with train.parallel=ddp, then FSDP runs can resume its checkpoints"
            )
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state(info: Ranks) -> dict[str, Any]:
    """Random-number state to resume exactly: rank 0's as ``torch``/``cuda`` (what one process
    restores), and every rank's under ``ranks`` (dropout differs per rank). Call it on every rank."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    if not info.enabled:
        return mine
    every: list[Any] = [None] * info.world_size
    dist.all_gather_object(every, mine, group=info.control)
    return {**mine, "ranks": every}


def restore_rng(rng: dict[str, Any], info: Ranks, seed: int, step: int) -> None:
    """Each rank takes back its own saved state; a rank the saving run did not have (more processes
    now) gets a fresh stream seeded by (seed, step, rank), never a copy of another rank's."""
    ranks = rng.get("ranks") or [rng]
    if info.rank < len(ranks):
        mine = ranks[info.rank]
        if "torch" in mine:
            torch.set_rng_state(mine["torch"])
        if "cuda" in mine and info.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"])
    else:
        torch.manual_seed(
            int(np.random.SeedSequence([seed % (1 << 63), step, info.rank]).generate_state(1)[0])
        )


def rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's random state (CPU, and CUDA on a CUDA device), to put back with rng_restore."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def rng_restore(snapshot: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)
