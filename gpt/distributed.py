"""Everything that knows about processes and ranks: init, teardown, rank-0 printing, device per
local rank, and wrapping the model for data parallelism (DDP or FSDP2) from the outside.

A single ``python train.py`` is world size 1 and never touches ``torch.distributed``; under
``torchrun --nproc_per_node=N train.py ...`` the usual environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) select the process group: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' prefers CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but Apple's MPS backend is not available; use device=auto")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"device={name!r} must be auto, cpu, cuda or mps")
    return torch.device(name)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    if dev.type == "cpu":
        # ranks share the machine's cores: one intra-op thread each avoids oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def print0(*args, info: DistInfo | None = None, **kwargs) -> None:
    """Print on rank 0 only (to stderr unless told otherwise)."""
    if info is not None and not info.is_main:
        return
    if info is None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    kwargs.setdefault("file", sys.stderr)
    print(*args, **kwargs, flush=True)


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str, mixed_dtype: torch.dtype | None):
    """Apply data parallelism to ``model`` from the outside; returns the module to train.
    DDP replicates the weights; FSDP2 (``fully_shard``) shards them per block and at the root."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32) if mixed_dtype else None
        kwargs = {"mp_policy": mp} if mp else {}
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ConfigError(f"train.parallel={parallel!r} must be ddp or fsdp")


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one communicates."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
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


def prepare_model(model: torch.nn.Module, info: DistInfo, train_cfg, dtype: torch.dtype) -> torch.nn.Module:
    """Move to the device, then apply activation checkpointing and data parallelism from outside."""
    model.to(info.device)
    if train_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return wrap_model(model, info, train_cfg.parallel, dtype if dtype != torch.float32 else None)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts. For FSDP2 this gathers the shards and must be called
    on every rank; for a plain or DDP-wrapped model it is the ordinary state_dict."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        FSDPModule = ()
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()
