"""Optimizer and learning-rate schedule.

``configure_optimizer`` builds AdamW with weight decay on matrices only (biases and norm gains are
not decayed: shrinking them towards zero only fights the normalisation), fused on GPUs.
``lr_at`` is the schedule as a pure function of the step, so resuming needs no scheduler state.

    opt = configure_optimizer(model, cfg.optim, device_type="cuda")
    for group in opt.param_groups: group["lr"] = lr_at(step, cfg.optim, cfg.train.max_steps)
"""

from __future__ import annotations

import inspect
import math

import torch

from gpt.config import OptimConfig
from gpt.errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: trainable tensors with >= 2 dims (matmul weights, embeddings) decay; the rest
    (biases, LayerNorm/RMSNorm gains) do not. Tied weights appear once (named_parameters dedups)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.lr} must be positive")
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    # the fused kernel does the whole update in one launch on GPUs; it also exists for CPU tensors
    # in recent torch but is not faster there, so only ask for it on accelerators
    fused = device_type in ("cuda", "mps") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup to cfg.lr over
    warmup_steps, then cosine / linear decay to lr * min_lr_ratio at max_steps, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule={cfg.schedule!r} must be cosine, linear or constant")
