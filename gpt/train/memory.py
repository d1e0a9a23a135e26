"""The memory a training step needs, estimated before the first one, so that an impractical shape
(``model.block_size=100000`` on a small machine) is refused in a second instead of thrashing for
minutes.

    check_memory(model.config, micro_batch_size=16, dtype=torch.float32, device=torch.device("cpu"))

The estimate follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): a block keeps about ``T * B * C * (34 + 5 * n_head * T / C)`` bytes of 16-bit
activations for the backward pass, the second term being the attention matrix, which fused
attention kernels (CUDA) never store; plus the logits and the weights, gradients and AdamW state
(16 bytes per parameter). It is rough by design: only a step that needs more than twice the memory
available is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gpt.config import TrainConfig
from gpt.device import free_memory
from gpt.errors import ConfigError
from gpt.model import GPTConfig

MARGIN = 2.0  # refuse only what is far out of reach: the estimate is rough


def param_count(config: GPTConfig) -> int:
    """Trainable parameters of ``config``'s model (the tied head once; norms and biases left out)."""
    C, L, H, kv = config.n_embd, config.n_layer, config.mlp_width, config.kv_heads * config.head_size
    mlp = (3 if config.mlp == "swiglu" else 2) * C * H
    return L * (C * (C + 2 * kv) + C * C + mlp) + config.vocab_size * C


def block_bytes(config: GPTConfig, micro_batch_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Estimated bytes one block keeps for its backward (Korthikanti et al., see the module docstring)."""
    T, B, C = config.block_size, micro_batch_size, config.n_embd
    H, kv = config.mlp_width, config.kv_heads * config.head_size
    scale = (4 if dtype == torch.float32 else 2) / 2  # the formula counts 16-bit activations
    # scaled_dot_product_attention's fused kernels (flash / memory-efficient on CUDA, flash on CPUs)
    # keep no (T, T) attention matrix; with dropout the math path stores it
    fused = device.type in ("cuda", "cpu") and config.dropout == 0.0
    # 34 C = 11 C (attention: its input, q, k, v, softmax out, ...) + 4 C (norms) + 19 C (an MLP of
    # 4 C: 3 C + 4 H); grouped-query attention stores smaller k and v, SwiGLU twice the hidden tensors
    width = 11 * C - 4 * (C - kv) + 4 * C + 3 * C + (8 if config.mlp == "swiglu" else 4) * H
    return int(T * B * (width + (0 if fused else 5 * config.n_head * T)) * scale)


def activation_bytes(config: GPTConfig, micro_batch_size: int, dtype: torch.dtype, device: torch.device,
                     activation_checkpointing: bool = False) -> int:  # fmt: skip
    """Estimated bytes a micro-step's forward keeps for its backward: every block's (with activation
    checkpointing: each block's input, and one block recomputed), and the fp32 logits, their
    softmax and its gradient."""
    T, B, L = config.block_size, micro_batch_size, config.n_layer
    per_block = block_bytes(config, B, dtype, device)
    scale = 4 if dtype == torch.float32 else 2
    blocks = (T * B * config.n_embd * scale * L + per_block) if activation_checkpointing else per_block * L
    return int(blocks + 3 * B * T * config.vocab_size * 4)


def step_bytes(config: GPTConfig, micro_batch_size: int, dtype: torch.dtype, device: torch.device,
               activation_checkpointing: bool = False, shards: int = 1) -> int:  # fmt: skip
    """Estimated peak bytes of one training micro-step in one process, the fp32 weights, gradients
    and AdamW state split over ``shards`` ranks (FSDP; 1 = whole). The peak is either the start of
    the backward pass (weights and AdamW state, 12 bytes a parameter, every activation, and one
    block's gradients in flight, about its activations' size) or its end (the gradients too, 16
    bytes a parameter, the activations freed). Under FSDP each rank also holds two blocks unsharded
    (the one computing and the one prefetched) with their gradients. Calibrated on this CPU
    against the resident peak of real steps: bench/memory_estimate.py, docs/benchmarks.md."""
    n = param_count(config)
    acts = activation_bytes(config, micro_batch_size, dtype, device, activation_checkpointing)
    in_flight = block_bytes(config, micro_batch_size, dtype, device)
    gathered = 0
    if shards > 1:
        per_layer = (n - config.vocab_size * config.n_embd) // max(config.n_layer, 1)
        gathered = 2 * per_layer * ((4 if dtype == torch.float32 else 2) + 4)
    return int(max(12 * n / shards + acts + in_flight, 16 * n / shards) + gathered)


def check_memory(config: GPTConfig, micro_batch_size: int, dtype: torch.dtype, device: torch.device,
                 activation_checkpointing: bool = False) -> None:  # fmt: skip
    """ConfigError when a training step would need far more memory than ``device`` has free."""
    need, have = (
        step_bytes(config, micro_batch_size, dtype, device, activation_checkpointing),
        free_memory(device),
    )
    if have is None or need <= MARGIN * have:
        return
    gib = 2**30
    raise ConfigError(
        f"model.block_size={config.block_size} with micro-batches of {micro_batch_size} sequences needs "
        f"about {need / gib:,.0f} GiB per training step, but {device} has {have / gib:,.1f} GiB free; use a "
        "smaller model.block_size or train.micro_batch_size, or train.activation_checkpointing=true"
    )


PLAN_MARGIN = 0.10  # the planner leaves this fraction of the device free: allocator fragmentation, NCCL


@dataclass
class Plan:
    """The planner's choice for one rank: a micro-batch and whether to recompute activations."""

    micro_batch_size: int
    activation_checkpointing: bool
    peak: int  # estimated peak bytes per rank (step_bytes)
    budget: int  # the device's memory less PLAN_MARGIN
    why: str


def plan(config: GPTConfig, per_rank: int, device_memory: int, dtype: torch.dtype, shards: int = 1,
         micro_batch_size: int | None = None, activation_checkpointing: bool = False,
         device: torch.device | None = None) -> Plan:  # fmt: skip
    """The largest micro-batch (a divisor of the ``per_rank`` sequences) whose estimated peak fits
    ``device_memory`` less the margin, without activation checkpointing if one fits so, else with
    it; a given ``micro_batch_size`` (or ``activation_checkpointing=True``) is kept and only checked.
    ConfigError when nothing fits (the world size or the device is too small for the model)."""
    budget, gib = int(device_memory * (1 - PLAN_MARGIN)), 2**30
    device = device or torch.device("cuda")  # a GPU job by default: fused attention stores no scores
    divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
    sizes = [micro_batch_size] if micro_batch_size else divisors
    for ac in (True,) if activation_checkpointing else (False, True):
        for mbs in sizes:
            peak = step_bytes(config, mbs, dtype, device, ac, shards)
            if peak <= budget:
                alone = step_bytes(config, mbs, dtype, device, False, shards)
                why = (f"micro-batch {mbs} of {per_rank} sequences per rank needs ~{peak / gib:.1f} GiB of "
                       f"{budget / gib:.1f} GiB ({device_memory / gib:.3g} GiB less {PLAN_MARGIN:.0%})")
                if ac and not activation_checkpointing:
                    why += f"; activation checkpointing on: without it ~{alone / gib:.1f} GiB"
                return Plan(mbs, ac, peak, budget, why)
    need = step_bytes(config, sizes[-1], dtype, device, True, shards)
    raise ConfigError(
        f"the model does not fit: micro-batch {sizes[-1]} with activation checkpointing needs ~"
        f"{need / gib:.1f} GiB per rank, train.device_memory allows {budget / gib:.1f} GiB; use more ranks "
        "with train.parallel=fsdp, a smaller model.block_size, or larger devices"
    )


def planned(train: TrainConfig, config: GPTConfig, world_size: int, device: torch.device, dtype: torch.dtype
            ) -> tuple[TrainConfig, str | None]:  # fmt: skip
    """``train`` with the planner's micro_batch_size and activation_checkpointing when
    train.device_memory is set (auto: the device's free memory), and the planner's reason; else
    ``train`` unchanged and None."""
    if train.device_memory is None:
        return train, None
    memory = train.device_memory_bytes() or free_memory(device)
    if memory is None:
        raise ConfigError(f"train.device_memory=auto: the free memory of {device} is unknown; give a size "
                          "such as 80GiB")  # fmt: skip
    shards = world_size if train.parallel == "fsdp" else 1
    choice = plan(config, train.batch_size // world_size, memory, dtype, shards, train.micro_batch_size,
                  train.activation_checkpointing, device)  # fmt: skip
    chosen = replace(train, micro_batch_size=choice.micro_batch_size,
                     activation_checkpointing=choice.activation_checkpointing)  # fmt: skip
    return chosen, choice.why
