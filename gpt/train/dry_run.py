"""Plan a job of N ranks on one CPU: ``python train.py model=gpt2-xl train.parallel=fsdp
train.dry_run=64`` builds the model as rank 0 of 64 on PyTorch's fake process group (its collectives
return at once and move no data) with fake tensors (shapes and dtypes, no memory), runs one step
through the real code paths (FSDP2 sharding and activation checkpointing of gpt.train.distributed,
the optimizer and gradient clipping of gpt.train.optim, the guard's check) and prints per-rank
memory, step FLOPs, the planner's choice (gpt.train.memory.plan) and what the checkpoint save takes
from a rank (train.checkpoint_format: its shards, or all of it on rank 0). Nothing is written.

What is exact and what is estimated: parameters, gradients and optimizer state are counted from
the tensors this rank holds after the step (FSDP2's shards); activations are the bytes autograd
saved for the backward pass of the fake step (with activation checkpointing, each block's input),
next to the one estimate (gpt.train.memory), which also gives the peak. DDP wraps the fake weights
without its start-up broadcast, its buckets keeping their gradients (gpt.train.distributed.wrap_model).
The save runs as far as the state dicts it writes (gpt.train.sharded.sharded_state); fake tensors
hold no bytes to write.
A batch that does not divide over the ranks, or a model that fits no micro-batch, fails here in one
line, as the real job would.
"""

from __future__ import annotations

import contextlib
import resource

import torch
import torch.distributed as dist

from gpt.config import TrainRunConfig
from gpt.device import DTYPES
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.ranks import Ranks
from gpt.train import distributed as D
from gpt.train.guard import Guard
from gpt.train.loop import split_batch
from gpt.train.memory import activation_bytes, plan
from gpt.train.optim import clip_gradients, configure_optimizer
from gpt.train.sharded import sharded_state, use_sharded

H100_BF16 = 989e12  # FLOP/s, an H100 SXM's dense bf16 peak: the default for tokens/s
MFU = 0.40  # the model FLOP utilisation tokens/s are stated at
PLAN_FOR = 80 * 2**30  # device memory a dry run plans for unless train.device_memory says


def dry_vocab(cfg: TrainRunConfig) -> int:
    """The vocabulary the job will have, without preparing its data: GPT-2's for tokenizer=gpt2, the
    target size for bpe, 256 for char (a bound: the corpus decides), GPTConfig's default otherwise."""
    kind = cfg.data.tokenizer
    n = {"gpt2": 50257, "bpe": cfg.data.vocab_size, "char": 256}.get(kind, GPTConfig.vocab_size)
    return pad_vocab(n)


def _local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor's local shard; each tensor once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> int:
    """Bytes of model and optimizer state the checkpoint save takes from this rank: its shards
    (get_state_dict, what gpt.train.sharded writes) or, one file, the whole state rank 0 gathers."""
    state = sharded_state(model, optimizer)
    tensors = [t for t in _tensors(state) if t.dim() > 0]  # AdamW's scalar step counts are noise
    if sharded:
        return _local_bytes(tensors)
    return sum(t.numel() * t.element_size() for t in tensors)  # a DTensor's numel is the whole tensor's


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _to_empty_tied(model: torch.nn.Module) -> None:
    """``model.to_empty`` on the CPU, keeping tied parameters tied: to_empty gives each module its own
    tensor, which would untie the head from the token table (a DDP dry run then counted the table
    twice: its parameters, gradients, optimizer state and step FLOPs). FSDP2 keeps its own ties."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    model.to_empty(device="cpu")
    for tied in owners.values():
        first = getattr(tied[0][0], tied[0][1])
        for module, name in tied[1:]:
            setattr(module, name, first)


def _fake_step(model: torch.nn.Module, cfg: TrainRunConfig, mbs: int, dtype: torch.dtype,
               info: Ranks) -> dict[str, int]:  # fmt: skip
    """One training step on fake tensors; returns the bytes this rank holds per kind, and those its
    checkpoint save takes."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    saved: list[int] = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    # the meta model was sharded outside the fake mode (FSDP2 builds its device mesh from real tensors)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _to_empty_tied(model)
        optimizer = configure_optimizer(model, cfg.optim, "cpu")
        # DDP wraps the fake weights (FSDP2 sharded the meta model before, see dry_run)
        trained = D.wrap_model(model, info, "ddp", None, fake=True) if cfg.train.parallel == "ddp" else model
        x = torch.randint(0, model.config.vocab_size, (mbs, model.config.block_size))
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = trained(x, x)
        loss.backward()
        grads = _local_bytes(p.grad for p in model.parameters())
        # the global norm runs; on the CPU the clip then tests its value, which a fake tensor lacks
        with contextlib.suppress(DataDependentOutputException):
            clip_gradients(model, cfg.optim.grad_clip or float("inf"), foreach=True)
        # fake tensors have no values: the guard judges a stand-in finite loss, as a healthy step's
        if Guard(cfg.train).check(1.0, False) == "ok":
            optimizer.step()
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        sharded = use_sharded(cfg.train, info, None)
        return {"params": _local_bytes(model.parameters()), "grads": grads, "optimizer": _local_bytes(state),
                "saved": saved[0], "checkpoint": _checkpoint_bytes(model, optimizer, sharded)}  # fmt: skip


def _fake_world(world: int) -> None:
    """Join PyTorch's fake process group as rank 0 of ``world``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def dry_run(cfg: TrainRunConfig) -> str:
    """Plan ``cfg`` as a job of ``cfg.train.dry_run`` ranks (see the module docstring); the report."""
    t, world = cfg.train, cfg.train.dry_run
    dtype = torch.bfloat16 if t.dtype == "auto" else DTYPES[t.dtype]  # auto: bf16 on the cluster's GPUs
    per_rank = split_batch(t.batch_size, None, world)[0]  # one line when the batch does not divide
    if t.micro_batch_size:
        split_batch(t.batch_size, t.micro_batch_size, world)
    config = GPTConfig(**{**cfg.model.given(), "vocab_size": dry_vocab(cfg)})
    shards = world if t.parallel == "fsdp" else 1
    budget = t.device_memory_bytes() or PLAN_FOR
    choice = plan(config, per_rank, budget, dtype, shards, t.micro_batch_size, t.activation_checkpointing)
    with torch.device("meta"):
        model = GPT(config)
    if choice.activation_checkpointing:
        D.apply_activation_checkpointing(model)
    try:
        _fake_world(world)
        info = Ranks(world_size=world, device=torch.device("cpu"))
        if t.parallel == "fsdp":
            model = D.wrap_model(model, info, "fsdp", dtype if dtype != torch.float32 else None)
        held = _fake_step(model, cfg, choice.micro_batch_size, dtype, info)
    finally:
        D.teardown()
    return _report(cfg, config, model, choice, held, dtype)


def _report(cfg: TrainRunConfig, config: GPTConfig, model: GPT, choice, held: dict[str, int],
            dtype: torch.dtype) -> str:  # fmt: skip
    t, world, gib = cfg.train, cfg.train.dry_run, 2**30
    mbs = choice.micro_batch_size
    n = sum(p.numel() for p in model.parameters())
    est = activation_bytes(config, mbs, dtype, torch.device("cuda"), choice.activation_checkpointing)
    fpt = model.flops_per_token(config.block_size)
    step_flops = fpt * t.batch_size * config.block_size
    peak = t.peak_flops or H100_BF16
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saves = "its shards" if use_sharded(t, Ranks(world_size=world), None) else "rank 0 gathers all"
    rows = [
        ("parameters (fp32)", held["params"]),
        ("gradients (fp32)", held["grads"]),
        ("optimizer state", held["optimizer"]),
        (f"activations, micro-batch {mbs} (saved / estimate)", None),
        ("peak (estimate)", choice.peak),
        (f"checkpoint save ({saves})", held["checkpoint"]),
    ]
    lines = [
        f"dry run: rank 0 of {world}, train.parallel={t.parallel}, {n / 1e6:,.0f}M parameters, "
        f"block_size={config.block_size}, vocab={config.vocab_size}, {str(dtype).removeprefix('torch.')}",
        f"batch: {t.batch_size} sequences = {world} ranks x {t.batch_size // world} "
        f"(micro-batch {mbs} x {t.batch_size // world // mbs} accumulation steps)",
        f"planner: {choice.why}",
        "| per rank | GiB |",
        "| --- | --- |",
    ]
    for name, value in rows:
        cell = f"{held['saved'] / gib:.2f} / {est / gib:.2f}" if value is None else f"{value / gib:.2f}"
        lines.append(f"| {name} | {cell} |")
    lines += [
        f"step: {step_flops:.3g} FLOP ({fpt / 1e9:.2f} GFLOP/token); at {MFU:.0%} MFU of "
        f"{peak / 1e12:,.0f} TFLOP/s per GPU: {MFU * peak * world / fpt:,.0f} tokens/s, "
        f"{step_flops / (MFU * peak * world):.2f} s/step",
        f"this dry run's peak RSS: {rss / gib:.2f} GiB (the model's fp32 weights alone: "
        f"{4 * n / gib:.2f} GiB)",
    ]
    return "\n".join(lines)
