"""LoRA: low-rank adapters on the linear layers of a frozen GPT, and folding them back into it.

    python train.py experiment=finetune init_from=hf:models/gpt2 data=text data.path=notes.txt \\
        finetune.method=lora optim.lr=1e-3
    python sample.py ckpt=out/finetune                          # adapters loaded unmerged
    gpt merge ckpt=out/finetune out=out/merged   # a plain checkpoint (gpt/commands/export.py)

A targeted ``nn.Linear`` (y = x W^T + b, W (out, in)) becomes a ``LoRALinear`` computing
y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T with A (rank, in) and B (out, rank). B starts
at zero, so training starts from the base model exactly; only A and B train. The state-dict keys of
the base weights are unchanged (``h.0.attn.c_attn.weight``); the adapters add ``...c_attn.lora_A``
and ``...c_attn.lora_B``.

A LoRA run's checkpoint holds the adapters only (a few MB for GPT-2) plus a ``"lora"`` entry: the
settings, where the base model is (``init_from``) and a fingerprint of its weights, so that loading
(``gpt.runs.load``) and ``resume=true`` rebuild the base and refuse one that changed. This module is
the layer and its math only; the run side is ``gpt.train.init`` (a new LoRA run) and ``gpt.runs.load``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.checkpoint import check_state_dict
from gpt.errors import ConfigError

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # nn.Module's constructor, not nn.Linear's: the base tensors are reused, nothing re-allocated
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.scale = rank, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = nn.Dropout(dropout)
        self.train(base.training)  # a model in eval mode stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update scale * B A, (out, in), computed in fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B A (and the same bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = (self.weight.float() + self.delta()).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear


def _matches(name: str, target: str) -> bool:
    """'c_proj' matches every block's attn.c_proj and mlp.c_proj; 'attn.c_proj' only the first."""
    return ("." + name).endswith("." + target)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Wrap the blocks' linear layers named by ``targets`` in LoRALinear and freeze everything
    else; returns the wrapped modules' names. ConfigError for a target that matches nothing."""
    blocks = model.transformer.h
    linears = [(n, m) for n, m in blocks.named_modules() if type(m) is nn.Linear]
    unknown = [t for t in targets if not any(_matches(n, t) for n, _ in linears)]
    if unknown or not targets:
        valid = sorted({n.split(".", 1)[1] for n, _ in linears} | {n.rsplit(".", 1)[1] for n, _ in linears})
        raise ConfigError(f"finetune.lora_targets={targets} matches no linear layer for {unknown}; "
                          f"valid: {valid}")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in linears:
        if any(_matches(name, t) for t in targets):
            parent, _, attr = name.rpartition(".")
            setattr(blocks.get_submodule(parent), attr, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(f"transformer.h.{name}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: plain nn.Linear modules again, all
    parameters trainable, state-dict keys those of the base model. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries (lora_A, lora_B) of a state dict."""
    return {k: v for k, v in state_dict.items() if k.endswith(ADAPTER_SUFFIXES)}


def attach(model: nn.Module, spec: dict[str, Any], adapter: dict[str, torch.Tensor] | None, source: str
           ) -> None:  # fmt: skip
    """Apply LoRA as ``spec`` says, then load ``adapter`` (when given) strictly."""
    apply_lora(model, spec["rank"], spec["alpha"], spec["dropout"], spec["targets"])
    if adapter is not None:
        check_state_dict(adapter_weights(model.state_dict()), adapter, source)
        model.load_state_dict(adapter, strict=False)


def describe(model: nn.Module, spec: dict[str, Any]) -> str:
    """One line: the adapters and how much of the model trains."""
    n_layers = sum(isinstance(m, LoRALinear) for m in model.modules())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = ", ".join(spec["targets"])
    return (
        f"LoRA: rank {spec['rank']}, alpha {spec['alpha']}, on {n_layers} layers ({targets}); "
        f"{trainable / 1e6:.3f}M trainable parameters ({100 * trainable / total:.2f}%), base {spec['base']}"
    )
