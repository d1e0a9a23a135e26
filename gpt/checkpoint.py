"""Checkpoints: atomic save, weights-only load, self-contained run directories.

A run directory (``out_dir``) holds ``ckpt.pt`` (the latest checkpoint), optionally ``best.pt``,
``config.yaml`` (the resolved run config), ``tokenizer.json`` and ``metrics.jsonl``. A checkpoint is
one ``torch.save`` of plain types and tensors:

    {"format": "gpt-checkpoint", "version": 1, "model": state_dict, "model_config": {...},
     "tokenizer": {...}, "optimizer": state_dict | None, "step": int, "tokens": int,
     "rng": {...}, "config": {...}, "best_val_loss": float | None}

so it is read back with ``torch.load(..., weights_only=True)`` (no unpickling of arbitrary objects),
and the model's shape and tokenizer always travel with its weights.

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
    own = model.state_dict()
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
    model.load_state_dict(state_dict)


def model_config_from(state: dict[str, Any]) -> GPTConfig:
    return GPTConfig.from_dict(dict(state["model_config"]))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", block_size: int | None = None
) -> tuple[GPT, Any, dict[str, Any]]:
    """Rebuild model and tokenizer from a checkpoint. ``block_size`` may shrink the context (learned
    position rows beyond it are dropped); it can never grow past what the model was trained for."""
    from gpt.tokenizer import tokenizer_from_state  # local: keeps this module light to import

    state = load_checkpoint(path)
    config = model_config_from(state)
    weights = state["model"]
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
    model.to(device)
    tokenizer = tokenizer_from_state(state["tokenizer"])
    return model, tokenizer, state
