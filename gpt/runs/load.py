"""The one loader: a model reference to weights, config and tokenizer, and from them a model.

A reference is a run directory, a checkpoint file, a LoRA run (adapters over a base model that is
loaded again and checked against its fingerprint) or ``hf:DIR`` (a Hugging Face GPT-2, Llama,
Mistral or Qwen2 directory). Sampling, evaluation, serving, export, merge and training's
``init_from``/``resume`` all read references here, so a reference means the same everywhere.

    from gpt.runs.load import load
    loaded = load("out/shakespeare_char")                  # config, weights, tokenizer, checkpoint
    model = loaded.build("cuda")                           # sampling, evaluation (LoRA: unmerged)
    model = load("out/finetune", merge=True).build()       # LoRA folded into the weights
    model = loaded.build("cpu", quantize="int8")           # int8 weights for inference (gpt.quant)
    loaded = load("hf:models/gpt2", block_size=512)        # what init_from starts from

The one cropping rule: ``block_size`` may only shrink (learned position rows beyond it are dropped);
asking for more positions than the model has is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    load_state_dict_strict,
)
from gpt.errors import CheckpointError
from gpt.interop.hf import import_hf
from gpt.lora import attach, merge_lora
from gpt.model import GPT, SHAPE_FIELDS, GPTConfig
from gpt.quant import Quantize, quantize_model
from gpt.tokenizer import Tokenizer
from gpt.tokenizer_load import tokenizer_from_state
from gpt.typed_config import resolve_path


@dataclass
class Loaded:
    """What a reference holds: enough to build the model, or for training to start from."""

    config: GPTConfig
    weights: dict[str, torch.Tensor]  # the whole model's; for a LoRA run its base model's
    tokenizer: Tokenizer
    source: str  # the checkpoint file read, or hf:DIR: for messages
    name: str  # the run's (or the directory's) name, for display
    state: dict[str, Any] = field(default_factory=dict)  # the checkpoint as saved ({} for hf:DIR)
    lora: dict[str, Any] | None = None  # a LoRA run's settings while its adapters are kept apart
    adapter: dict[str, torch.Tensor] | None = None  # ... and the adapters (lora_A, lora_B)

    def build(self, device: str | torch.device = "cpu", quantize: Quantize = "none") -> GPT:
        """The model with these weights (and adapters, unmerged), on ``device``; with
        ``quantize="int8"`` its linear layers hold int8 weights (gpt.quant), adapters merged first."""
        model = GPT(self.config)
        load_state_dict_strict(model, self.weights, self.source)
        if self.lora is not None:
            attach(model, self.lora, self.adapter, self.source)
            if quantize != "none":  # int8 weights take no adapters: fold them in (same outputs)
                merge_lora(model)
        return quantize_model(model, quantize).to(device)


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
    """init_from as an absolute reference, valid from any working directory (a run directory: the
    checkpoint it means now, ckpt.pt or a sharded run's newest ckpt-STEP.dcp)."""
    if init_from.startswith("hf:"):
        return "hf:" + str(resolve_path(init_from[3:]).resolve())
    return str(latest_checkpoint(resolve_path(init_from)).resolve())


def load(ref: str | Path, block_size: int | None = None, merge: bool = False,
         warn: Callable[[str], Any] | None = None) -> Loaded:  # fmt: skip
    """Read the model ``ref`` names (see the module docstring). ``block_size`` crops the context;
    ``merge=True`` folds a LoRA run's adapters into its weights (same outputs, plain modules);
    with ``warn``, a run directory's newest checkpoint that verifies is taken, each damaged one
    passed over being reported through it (what resume does)."""
    ref = str(ref)
    if ref.startswith("hf:"):
        directory = resolve_path(ref[3:])
        loaded = Loaded(*import_hf(directory), ref, directory.resolve().name)
    else:
        path = resolve_path(ref)
        state, file = load_latest(path, warn) if warn else (load_checkpoint(path), latest_checkpoint(path))
        config, lora = GPTConfig.from_dict(dict(state["model_config"])), state.get("lora")
        weights = state["model"] if lora is None else _base_weights(lora, config, str(file))
        tokenizer = tokenizer_from_state(state["tokenizer"])
        name = (path if path.is_dir() else path.parent).resolve().name
        adapter = None if lora is None else state["model"]
        loaded = Loaded(config, weights, tokenizer, str(file), name, state, lora, adapter)
    _crop(loaded, block_size)
    if merge and loaded.lora is not None:
        model = loaded.build()
        merge_lora(model)
        loaded.weights, loaded.lora, loaded.adapter = model.state_dict(), None, None
    return loaded


def _crop(loaded: Loaded, block_size: int | None) -> None:
    """The one cropping rule: the context may only shrink; the learned position table
    (block_size, n_embd) keeps its first rows (rotary models have none)."""
    have = loaded.config.block_size
    if block_size is None or block_size == have:
        return
    if block_size > have:
        raise CheckpointError(
            f"model.block_size={block_size} is larger than the {have} positions of {loaded.source}; "
            f"it may only shrink: use model.block_size<={have}"
        )
    loaded.config.block_size = block_size
    if "transformer.wpe.weight" in loaded.weights:
        wpe = loaded.weights["transformer.wpe.weight"][:block_size]
        loaded.weights = {**loaded.weights, "transformer.wpe.weight": wpe}


def _base_weights(spec: dict[str, Any], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """The base model's weights for a LoRA checkpoint ``source`` whose model_config is ``config``:
    loaded from where ``spec`` says, cut to config.block_size, checked against the fingerprint."""

    def exists(ref: str) -> bool:
        return Path(ref[3:]).expanduser().is_dir() if ref[:3] == "hf:" else checkpoint_path(ref).exists()

    refs = [r for r in dict.fromkeys([spec.get("base_path"), spec["base"]]) if r]
    found = next((r for r in refs if exists(r)), None)
    if found is None:
        raise CheckpointError(
            f"{source} holds LoRA adapters for the base model {spec['base']}, which is not found (looked "
            f"at {refs}); put the base model back there, or merge the adapters where it exists "
            "(gpt merge ckpt=... out=...)"
        )
    base = load(found, merge=True)
    diffs = [k for k in (*SHAPE_FIELDS, "vocab_size") if getattr(base.config, k) != getattr(config, k)]
    if base.config.block_size < config.block_size:
        diffs.append("block_size")
    if not diffs:
        _crop(base, config.block_size)
    if diffs or weights_fingerprint(base.weights) != spec["base_fingerprint"]:
        what = f"its {', '.join(diffs)} differ" if diffs else "its weights differ"
        raise CheckpointError(
            f"the base model {found} changed since the LoRA adapters in {source} were trained ({what}); "
            "restore the original base model, or train the adapters again"
        )
    return base.weights
