"""Optimizer and learning-rate schedule.

``configure_optimizer`` builds AdamW with weight decay on matrices only (biases and norm gains are
not decayed: shrinking them towards zero only fights the normalisation), fused on GPUs; or, with
``optim.name=muon``, ``torch.optim.Muon`` for the 2-D weight matrices of the blocks and AdamW for
the rest (embeddings, the head, norms, biases), stepped together as one ``Optimizers``.
``lr_at`` is the schedule as a pure function of the step, so resuming needs no scheduler state; a
group's ``lr_scale`` (Muon's: muon_lr / lr) puts every group on the same schedule at its own LR.
``clip_gradients`` is ``clip_grad_norm_`` without its multiply where the factor is 1 (on the CPU).

    opt = configure_optimizer(model, cfg.optim, device_type="cuda")
    for group in opt.param_groups: group["lr"] = lr_at(step, cfg.optim, max_steps) * group["lr_scale"]
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterator

import torch

from gpt.config import OptimConfig


def param_groups(
    model: torch.nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()
) -> list[dict]:
    """Two groups: trainable tensors with >= 2 dims (matmul weights, embeddings) decay; the rest
    (biases, LayerNorm/RMSNorm gains) do not. Tied weights appear once (named_parameters dedups).
    Parameters whose id() is in ``exclude`` (those another optimizer owns) are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# a parameter of the blocks: transformer.h.{i}.(attn|mlp).*
_BLOCK = re.compile(r"(^|\.)h\.\d+\.")


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The blocks' trainable 2-D weights, for Muon. Embeddings and the head are 2-D too, but a
    lookup table and a classifier are not hidden linear maps: Muon's orthogonalised update does not
    suit them (Keller Jordan, 2024), so they stay with AdamW, as do norms and biases."""
    return [p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and _BLOCK.search(n)]


class Optimizers:
    """Several torch optimizers stepped as one (Muon + AdamW). It iterates over them, which is what
    torch.distributed.checkpoint's get/set_state_dict accept, so the checkpoint holds one state dict
    keyed by parameter name, as with AdamW alone; GradScaler and the loop see ``param_groups``."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def configure_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device_type: str
) -> torch.optim.AdamW | Optimizers:
    matrices = muon_matrices(model) if cfg.name == "muon" else []
    exclude = frozenset(id(p) for p in matrices)
    groups = [g for g in param_groups(model, cfg.weight_decay, exclude) if g["params"]]
    for g in groups:
        g["lr_scale"] = 1.0
    # the fused kernel does the whole update in one call: on GPUs one launch; on the CPU it replaces
    # the per-tensor loop (default there), 2.6 -> 0.5 ms per step for the default 0.8M model
    fused = device_type in ("cuda", "mps", "cpu")
    fused = fused and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)
    if not matrices:
        return adamw
    # Muon: momentum, then Newton-Schulz orthogonalisation of each matrix's update (in bf16), with
    # the LR scaled by sqrt(max(1, rows / cols)) per matrix (Keller Jordan's original rule)
    muon_group = {"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}
    muon = torch.optim.Muon(
        [muon_group], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum
    )
    return Optimizers([muon, adamw])


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
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))  # cosine


def clip_gradients(model: torch.nn.Module, clip: float, foreach: bool | None = None) -> torch.Tensor:
    """``clip_grad_norm_`` in its two halves: the global gradient's norm (a plain tensor, also for
    FSDP2's sharded gradients; returned), then every gradient times min(1, clip / (norm + 1e-6)).
    Where that factor is exactly 1 (an unclipped step; clipping off: ``clip`` infinite) the multiply
    is skipped on the CPU, where reading the norm costs no sync: a pass over every gradient saved,
    the same numbers. Elsewhere the multiply is queued, as ``clip_grad_norm_`` does."""
    params = list(model.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=foreach)
    norm = total.full_tensor() if hasattr(total, "full_tensor") else total
    if norm.device.type != "cpu" or not bool(clip / (norm + 1e-6) >= 1.0):  # NaN: multiplied, as before
        torch.nn.utils.clip_grads_with_norm_(params, clip, total, foreach=foreach)
    return norm
