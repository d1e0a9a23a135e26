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
``ranks``: any number of processes resumes it (see gpt.train.distributed). A LoRA run's checkpoint holds
only the adapters in ``model``, plus ``lora``: their settings and where the base model is (see
gpt.runs.load, which rebuilds the base and attaches them).

    state = load_checkpoint("out/shakespeare_char")          # a run directory or a .pt file
    save_checkpoint(path, checkpoint_state(model_sd, config, tokenizer_state, step=100, ...))

Rebuilding a model from a run (LoRA bases, ``hf:DIR``, context cropping) is ``gpt.runs.load``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gpt.atomic import atomic_write
from gpt.errors import CheckpointError
from gpt.model import GPTConfig

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
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


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
        first = re.split(r"(?<=\.)\s", first)[0]  # its first whole sentence (torch's advice follows)
        raise CheckpointError(
            f"checkpoint {file} is corrupt or not a gpt checkpoint ({first}); "
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


def checkpoint_state(
    model: dict[str, torch.Tensor],
    model_config: GPTConfig | dict[str, Any],
    tokenizer: dict[str, Any],
    *,
    optimizer: dict[str, Any] | None = None,
    step: int = 0,
    tokens: int = 0,
    rng: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    best_val_loss: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one checkpoint schema (see the module docstring): what ``save_checkpoint`` writes.
    ``extra`` holds optional entries such as ``lora``."""
    if isinstance(model_config, GPTConfig):
        model_config = model_config.to_dict()
    state = {
        "model": model,
        "model_config": dict(model_config),
        "tokenizer": tokenizer,
        "optimizer": optimizer,
        "step": step,
        "tokens": tokens,
        "config": config or {},
        "best_val_loss": best_val_loss,
        **extra,
    }
    if rng is not None:
        state["rng"] = rng
    return state
