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

import torch

from gpt.device import free_memory
from gpt.errors import ConfigError
from gpt.model import GPTConfig

MARGIN = 2.0  # refuse only what is far out of reach: the estimate is rough


def step_bytes(config: GPTConfig, micro_batch_size: int, dtype: torch.dtype, device: torch.device,
               activation_checkpointing: bool = False) -> int:  # fmt: skip
    """Estimated peak bytes of one training micro-step (see the module docstring)."""
    T, B, C, L = config.block_size, micro_batch_size, config.n_embd, config.n_layer
    scale = (4 if dtype == torch.float32 else 2) / 2  # the formula counts 16-bit activations
    fused = device.type == "cuda" and config.dropout == 0.0  # flash / memory-efficient attention
    per_block = T * B * C * (34 + (0 if fused else 5 * config.n_head * T / C)) * scale
    blocks = (T * B * C * 2 * scale * L + per_block) if activation_checkpointing else per_block * L
    logits = 3 * B * T * config.vocab_size * 4  # fp32 logits, their softmax and its gradient
    n_params = 12 * L * C * C + config.vocab_size * C
    return int(blocks + logits + 16 * n_params)


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
