"""Rebuild a model from a reference: a run directory, a checkpoint file, a LoRA run (adapters over a
base model that is loaded again and checked), or ``hf:DIR`` (a Hugging Face GPT-2 directory).

    from gpt.runs.load import load_model, load_base
    model, tokenizer, state = load_model("out/shakespeare_char")          # for sampling, evaluation
    model, tokenizer, state = load_model("out/finetune", merge=True)      # LoRA folded into the weights
    config, weights, tokenizer, source = load_base("hf:models/gpt2")     # what init_from starts from

Training (``init_from``, ``resume``), sampling, serving, evaluation and export all load through here,
so a reference means the same everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import checkpoint_path, load_checkpoint, load_state_dict_strict, model_config_from
from gpt.errors import CheckpointError
from gpt.interop.hf import import_hf
from gpt.lora import attach, merge_lora
from gpt.model import GPT, SHAPE_FIELDS, GPTConfig, crop_block_size
from gpt.tokenizer import tokenizer_from_state


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """The identity of a set of weights: every key, shape, dtype and every byte of every tensor.
    Detects a base model replaced, retrained or edited in a single value."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def base_location(init_from: str) -> str:
    """init_from as an absolute reference, valid from any working directory."""
    if init_from.startswith("hf:"):
        return "hf:" + str(Path(init_from[3:]).expanduser().resolve())
    return str(checkpoint_path(init_from).resolve())


def load_base(init_from: str) -> tuple[GPTConfig, dict[str, torch.Tensor], Any, str]:
    """(model config, weights, tokenizer, source name) of a model to start from: a run directory or
    checkpoint file (a LoRA checkpoint gives its merged weights), or ``hf:DIR`` for a Hugging Face
    GPT-2 directory."""
    if init_from.startswith("hf:"):
        return (*import_hf(init_from[3:]), init_from)
    state = load_checkpoint(init_from)
    source = str(checkpoint_path(init_from))
    if "lora" in state:
        model, tokenizer, _ = load_model(init_from, merge=True)
        return model.config, model.state_dict(), tokenizer, source
    return model_config_from(state), state["model"], tokenizer_from_state(state["tokenizer"]), source


def base_weights(spec: dict[str, Any], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """The base model's weights for a LoRA checkpoint ``source`` whose model_config is ``config``:
    loaded from where ``spec`` says, cut to config.block_size, checked against the fingerprint."""

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
            "(gpt merge ckpt=... out=...)"
        )
    base_config, weights, _, _ = load_base(found)
    diffs = [k for k in (*SHAPE_FIELDS, "vocab_size") if getattr(base_config, k) != getattr(config, k)]
    if base_config.block_size < config.block_size:
        diffs.append("block_size")
    if not diffs:
        weights = crop_block_size(weights, config.block_size)
    if diffs or weights_fingerprint(weights) != spec["base_fingerprint"]:
        what = f"its {', '.join(diffs)} differ" if diffs else "its weights differ"
        raise CheckpointError(
            f"the base model {found} changed since the LoRA adapters in {source} were trained ({what}); "
            "restore the original base model, or train the adapters again"
        )
    return weights


def load_model(
    path: str | Path, device: str | torch.device = "cpu", block_size: int | None = None, merge: bool = False
) -> tuple[GPT, Any, dict[str, Any]]:
    """Rebuild model and tokenizer from a checkpoint. ``block_size`` may shrink the context (learned
    position rows beyond it are dropped); it can never grow past what the model was trained for.
    A LoRA checkpoint (adapters only) loads its base model again and attaches the adapters, or
    folds them into the weights with ``merge=True`` (same outputs, plain modules, faster)."""
    state = load_checkpoint(path)
    source = str(checkpoint_path(path))
    config = model_config_from(state)
    weights, lora = state["model"], state.get("lora")
    if lora is not None:
        weights = base_weights(lora, config, source)
    if block_size is not None and block_size != config.block_size:
        if block_size > config.block_size:
            raise CheckpointError(
                f"block_size={block_size} is larger than the {config.block_size} positions the "
                f"model in {source} supports; use model.block_size<={config.block_size}"
            )
        config.block_size = block_size
        weights = crop_block_size(weights, block_size)
    model = GPT(config)
    load_state_dict_strict(model, weights, source)
    if lora is not None:
        attach(model, lora, state["model"], source)
        if merge:
            merge_lora(model)
    model.to(device)
    return model, tokenizer_from_state(state["tokenizer"]), state
