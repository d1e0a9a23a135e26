"""Checkpoints: atomic save, weights-only load, self-contained run directories.

A run directory (``out_dir``) holds ``ckpt.pt`` (the latest checkpoint), optionally ``best.pt``,
``config.yaml`` (the resolved run config), ``tokenizer.json`` and ``metrics.jsonl``. A checkpoint is
one ``torch.save`` of plain types and tensors:

    {"format": "gpt-checkpoint", "version": 1, "model": state_dict, "model_config": {...},
     "tokenizer": {...}, "optimizer": state_dict | None, "step": int, "tokens": int,
     "rng": {...}, "config": {...}, "best_val_loss": float | None}

so it is read back with ``torch.load(..., weights_only=True)`` (no unpickling of arbitrary objects),
and the model's shape and tokenizer always travel with its weights. Whatever wrote it (one process,
DDP or FSDP ranks), the tensors are full and the optimizer state is keyed by parameter name (the
layout of ``torch.distributed.checkpoint.state_dict``), and ``rng`` holds every rank's state under
``ranks``: any number of processes resumes it (see gpt.distributed). A LoRA run's checkpoint holds
only the adapters in ``model``, plus ``lora``: their settings and where the base model is (see
gpt.lora); ``load_model`` rebuilds the base and attaches them.

    from gpt.checkpoint import load_model
    model, tokenizer, ckpt = load_model("out/shakespeare_char")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from gpt.errors import CheckpointError
from gpt.model import GPT, GPTConfig

FORMAT = "gpt-checkpoint"
VERSION = 1
CKPT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for a run directory (its ckpt.pt) or a checkpoint file given directly."""
    p = Path(path).expanduser()
    return p / CKPT_NAME if p.is_dir() or not p.suffix else p


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (file or run directory) with ``weights_only=True``."""
    file = checkpoint_path(path)
    if not file.exists():
        raise CheckpointError(
            f"no checkpoint at {file}: train one first (python train.py out_dir={Path(path)}) "
            "or point to an existing run directory"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with disallowed globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {file} is corrupt or not a gpt checkpoint ({first[:200]}); "
            "restore it from a backup or train again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a gpt checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has checkpoint version {state.get('version')}, this code reads version {VERSION}"
        )
    for key in ("model", "model_config", "tokenizer"):
        if key not in state:
            raise CheckpointError(f"checkpoint {file} lacks '{key}'; it is incomplete, train again")
    return state


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, or raise CheckpointError listing missing/unexpected keys and shape mismatches."""
    check_state_dict(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def check_state_dict(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing the keys missing from / unexpected in ``state_dict`` and the
    shapes that differ from ``own`` (the state dict it must match)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise CheckpointError(f"weights in {source} do not match the model: " + "; ".join(parts))


def model_config_from(state: dict[str, Any]) -> GPTConfig:
    return GPTConfig.from_dict(dict(state["model_config"]))


def load_base(init_from: str) -> tuple[GPTConfig, dict[str, torch.Tensor], Any, str]:
    """(model config, weights, tokenizer, source name) of a model to start from: a run directory or
    checkpoint file (a LoRA checkpoint gives its merged weights), or ``hf:DIR`` for a Hugging Face
    GPT-2 directory."""
    from gpt.tokenizer import tokenizer_from_state

    if init_from.startswith("hf:"):
        from gpt.hf import import_hf

        return (*import_hf(init_from[3:]), init_from)
    state = load_checkpoint(init_from)
    source = str(checkpoint_path(init_from))
    if "lora" in state:
        model, tokenizer, _ = load_model(init_from, merge=True)
        return model.config, model.state_dict(), tokenizer, source
    return model_config_from(state), state["model"], tokenizer_from_state(state["tokenizer"]), source


def load_model(
    path: str | Path, device: str | torch.device = "cpu", block_size: int | None = None, merge: bool = False
) -> tuple[GPT, Any, dict[str, Any]]:
    """Rebuild model and tokenizer from a checkpoint. ``block_size`` may shrink the context (learned
    position rows beyond it are dropped); it can never grow past what the model was trained for.
    A LoRA checkpoint (adapters only) loads its base model again and attaches the adapters, or
    folds them into the weights with ``merge=True`` (same outputs, plain modules, faster)."""
    from gpt.tokenizer import tokenizer_from_state  # local: keeps this module light to import

    state = load_checkpoint(path)
    config = model_config_from(state)
    weights, lora = state["model"], state.get("lora")
    if lora is not None:
        from gpt.lora import base_weights

        weights = base_weights(lora, config, str(checkpoint_path(path)))
    if block_size is not None and block_size != config.block_size:
        if block_size > config.block_size:
            raise CheckpointError(
                f"block_size={block_size} is larger than the {config.block_size} positions the "
                f"model in {checkpoint_path(path)} supports; use model.block_size<={config.block_size}"
            )
        config.block_size = block_size
        if "transformer.wpe.weight" in weights:
            weights = dict(weights)
            weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:block_size]
    model = GPT(config)
    load_state_dict_strict(model, weights, str(checkpoint_path(path)))
    if lora is not None:
        from gpt.lora import attach, merge_lora

        attach(model, lora, state["model"], str(checkpoint_path(path)))
        if merge:
            merge_lora(model)
    model.to(device)
    tokenizer = tokenizer_from_state(state["tokenizer"])
    return model, tokenizer, state
