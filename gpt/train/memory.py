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
    H, kv = config.mlp_width, config.kv_heads * config.head_size
    scale = (4 if dtype == torch.float32 else 2) / 2  # the formula counts 16-bit activations
    fused = device.type == "cuda" and config.dropout == 0.0  # flash / memory-efficient attention
    # 34 C = 11 C (attention: its input, q, k, v, softmax out, ...) + 4 C (norms) + 19 C (an MLP of
    # 4 C: 3 C + 4 H); grouped-query attention stores smaller k and v, SwiGLU twice the hidden tensors
    width = 11 * C - 4 * (C - kv) + 4 * C + 3 * C + (8 if config.mlp == "swiglu" else 4) * H
    per_block = T * B * (width + (0 if fused else 5 * config.n_head * T)) * scale
    blocks = (T * B * C * 2 * scale * L + per_block) if activation_checkpointing else per_block * L
    logits = 3 * B * T * config.vocab_size * 4  # fp32 logits, their softmax and its gradient
    mlp = (3 if config.mlp == "swiglu" else 2) * C * H
    n_params = L * (C * (C + 2 * kv) + C * C + mlp) + config.vocab_size * C
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
