"""LoRA: low-rank adapters on the linear layers of a frozen GPT, and folding them back into it.

    python train.py experiment=finetune init_from=hf:models/gpt2 data=text data.path=notes.txt \\
        finetune.method=lora optim.lr=1e-3
    python sample.py ckpt=out/finetune                          # adapters loaded unmerged
    python -m gpt.lora merge ckpt=out/finetune out=out/merged   # a plain full checkpoint

A targeted ``nn.Linear`` (y = x W^T + b, W (out, in)) becomes a ``LoRALinear`` computing
y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T with A (rank, in) and B (out, rank). B starts
at zero, so training starts from the base model exactly; only A and B train. The state-dict keys of
the base weights are unchanged (``h.0.attn.c_attn.weight``); the adapters add ``...c_attn.lora_A``
and ``...c_attn.lora_B``.

A LoRA run's checkpoint holds the adapters only (a few MB for GPT-2) plus a ``"lora"`` entry: the
settings, where the base model is (``init_from``) and a fingerprint of its weights, so that loading
(``gpt.checkpoint.load_model``) and ``resume=true`` rebuild the base and refuse one that changed.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gpt.config import TrainRunConfig
    from gpt.model import GPTConfig

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
        raise ConfigError(
            f"finetune.lora_targets={targets} matches no linear layer for {unknown}; valid: {valid}"
        )
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


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a set of weights: every key, shape, and an evenly spaced sample of each
    tensor's values (up to 4096 per tensor). Detects a base model replaced or retrained."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().flatten()
        sample = t[:: max(1, t.numel() // 4096)].float().cpu().numpy()
        h.update(f"{key}{tuple(state_dict[key].shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:32]


def _base_location(init_from: str) -> str:
    """init_from as an absolute reference, valid from any working directory."""
    if init_from.startswith("hf:"):
        return "hf:" + str(Path(init_from[3:]).expanduser().resolve())
    from gpt.checkpoint import checkpoint_path

    return str(checkpoint_path(init_from).resolve())


def prepare_lora(
    cfg: TrainRunConfig,
    resume_state: dict[str, Any] | None,
    model_config: GPTConfig | None,
    weights: dict[str, torch.Tensor] | None,
    source: str,
) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """For ``setup_run``: (lora spec or None, base weights to load, adapter weights or None).
    A new LoRA run records its settings and base; a resumed one reloads the base it names."""
    ft = cfg.finetune
    if resume_state is not None:
        spec = resume_state.get("lora")
        if spec is None:
            if ft.method == "lora":
                raise ConfigError(f"{source} is not a LoRA run: resume it with finetune.method=full")
            return None, weights, None
        if ft.method != "lora":
            raise ConfigError(f"{source} is a LoRA run: resume it with finetune.method=lora")
        diffs = [
            f"finetune.lora_{k}={getattr(ft, 'lora_' + k)} (checkpoint: {spec[k]})"
            for k in ("rank", "alpha", "dropout", "targets")
            if getattr(ft, "lora_" + k) != spec[k]
        ]
        if diffs:
            raise ConfigError(f"the LoRA settings differ from the run being resumed: {'; '.join(diffs)}")
        return spec, base_weights(spec, model_config, source), weights
    if ft.method != "lora":
        return None, weights, None
    if weights is None:
        raise ConfigError(
            "finetune.method=lora adapts an existing model: set init_from=DIR (a run directory) or "
            "init_from=hf:DIR (a Hugging Face GPT-2 directory)"
        )
    spec = {
        "rank": ft.lora_rank,
        "alpha": ft.lora_alpha,
        "dropout": ft.lora_dropout,
        "targets": list(ft.lora_targets),
        "base": cfg.init_from,  # as given, and resolved: found from any working directory
        "base_path": _base_location(cfg.init_from),
        "base_fingerprint": weights_fingerprint(weights),
    }
    return spec, weights, None


def base_weights(spec: dict[str, Any], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """The base model's weights for a LoRA checkpoint ``source`` whose model_config is ``config``:
    loaded from where ``spec`` says, cut to config.block_size, checked against the fingerprint."""
    from gpt.checkpoint import checkpoint_path, load_base
    from gpt.setup import SHAPE_FIELDS

    def exists(ref: str) -> bool:
        return (
            Path(ref[3:]).expanduser().is_dir() if ref.startswith("hf:") else checkpoint_path(ref).is_file()
        )

    refs = [r for r in dict.fromkeys([spec.get("base_path"), spec["base"]]) if r]
    found = next((r for r in refs if exists(r)), None)
    if found is None:
        raise CheckpointError(
            f"{source} holds LoRA adapters for the base model {spec['base']}, which is not found (looked "
            f"at {refs}); put the base model back there, or merge the adapters where it exists "
            "(python -m gpt.lora merge ckpt=... out=...)"
        )
    base_config, weights, _, _ = load_base(found)
    diffs = [k for k in (*SHAPE_FIELDS, "vocab_size") if getattr(base_config, k) != getattr(config, k)]
    if base_config.block_size < config.block_size:
        diffs.append("block_size")
    if not diffs and "transformer.wpe.weight" in weights:
        weights = {
            **weights,
            "transformer.wpe.weight": weights["transformer.wpe.weight"][: config.block_size],
        }
    if diffs or weights_fingerprint(weights) != spec["base_fingerprint"]:
        what = f"its {', '.join(diffs)} differ" if diffs else "its weights differ"
        raise CheckpointError(
            f"the base model {found} changed since the LoRA adapters in {source} were trained ({what}); "
            "restore the original base model, or train the adapters again"
        )
    return weights


def attach(
    model: nn.Module, spec: dict[str, Any], adapter: dict[str, torch.Tensor] | None, source: str
) -> None:
    """Apply LoRA as ``spec`` says, then load ``adapter`` (when given) strictly."""
    from gpt.checkpoint import check_state_dict

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


# -------------------------------------------------------------------------------------- command line
USAGE = "python -m gpt.lora merge ckpt=RUN_DIR_OR_FILE out=OUT_DIR [overwrite=true]"


def merge_checkpoint(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Write ``out/ckpt.pt`` (and tokenizer.json): the LoRA checkpoint ``ckpt`` with its adapters
    folded into the base weights, a plain checkpoint that needs no base model."""
    from gpt.checkpoint import CKPT_NAME, checkpoint_path, load_model, save_checkpoint

    model, tokenizer, state = load_model(ckpt, merge=True)
    if "lora" not in state:
        raise ConfigError(f"{checkpoint_path(ckpt)} has no LoRA adapters: there is nothing to merge")
    target = Path(out).expanduser()
    target = target if target.suffix == ".pt" else target / CKPT_NAME
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another out or set overwrite=true")
    merged = {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": state["tokenizer"],
        "optimizer": None,  # a starting point (init_from), not a run to resume
        "step": state.get("step", 0),
        "tokens": state.get("tokens", 0),
        "config": state.get("config", {}),
        "best_val_loss": state.get("best_val_loss"),
    }
    save_checkpoint(target, merged)
    tokenizer.save(target.parent)
    return target


def main(argv: list[str] | None = None) -> None:
    from gpt.cli import run
    from gpt.export import parse_args

    argv = sys.argv[1:] if argv is None else argv

    def job(_: Any) -> None:
        if not argv or argv[0] != "merge":
            raise ConfigError(f"unknown command {' '.join(argv[:1]) or '(none)'}; usage: {USAGE}")
        args = parse_args(argv[1:], {"ckpt": None, "out": None, "overwrite": False}, USAGE)
        target = merge_checkpoint(args["ckpt"], args["out"], args["overwrite"])
        size_mb = target.stat().st_size / 1e6
        print(f"merged the LoRA adapters of {args['ckpt']} into {target} ({size_mb:.1f} MB)")

    run(job, {})


if __name__ == "__main__":
    main()
