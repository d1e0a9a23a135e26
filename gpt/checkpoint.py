"""Checkpoints: atomic save, weights-only load, self-contained run directories.

A run directory (``out_dir``) holds ``ckpt.pt`` (the latest checkpoint), the previous ones as
``ckpt-STEP.pt`` (``train.keep_last`` in all; a sharded run's are ``ckpt-STEP.dcp`` directories, see
gpt.dcp, read here into this same schema), optionally ``best.pt``, ``config.yaml`` (the resolved
run config), ``tokenizer.json`` and ``metrics.jsonl``. A checkpoint is one ``torch.save`` of plain
types and tensors:

    {"format": "gpt-checkpoint", "version": 1, "model": state_dict, "model_config": {...},
     "tokenizer": {...}, "optimizer": state_dict | None, "step": int, "tokens": int,
     "rng": {...}, "config": {...}, "best_val_loss": float | None, "checksum": "sha256 hex"}

``checksum`` covers every other entry (each tensor's bytes, dtype and shape; every plain value) and
is verified on load: torch's zip reader does not check its CRCs, so a flipped byte on disk would
otherwise load silently. ``load_latest`` takes the newest checkpoint that loads and verifies, and
reports the damaged ones it passed over. A checkpoint with non-finite weights is never written.

Plain types are read back with ``torch.load(..., weights_only=True)`` (no unpickling of any object),
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

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from gpt import dcp
from gpt.atomic import atomic_write
from gpt.errors import CheckpointError
from gpt.model import GPTConfig

FORMAT = "gpt-checkpoint"
VERSION = 1
CKPT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for a run directory (its ckpt.pt) or a checkpoint file (or sharded
    checkpoint directory, gpt.dcp) given directly."""
    p = Path(path).expanduser()
    if p.suffix == dcp.SUFFIX:
        return p
    return p / CKPT_NAME if p.is_dir() or not p.suffix else p


def latest_checkpoint(path: str | Path) -> Path:
    """What a reference means: a checkpoint file or sharded directory as given; for a run directory its
    newest checkpoint of either format (``history``), ckpt.pt when it has none."""
    p = Path(path).expanduser()
    if p.is_dir() and p.suffix != dcp.SUFFIX and (found := history(p)):
        return found[0]
    return checkpoint_path(p)


HISTORY_RE = re.compile(r"^ckpt-(\d+)\.(pt|dcp)$")


def _tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"T{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def payload_checksum(state: dict[str, Any]) -> str:
    """sha256 over everything in ``state`` but its ``checksum``: keys in sorted order, each tensor's
    dtype, shape and bytes, the repr of every plain value. The tensors are hashed in threads
    (hashlib releases the GIL), then their digests in order."""
    h = hashlib.sha256()
    tensors: list[torch.Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            h.update(b"T")
        elif isinstance(value, dict):
            h.update(b"{")
            for k in sorted(value, key=str):
                h.update(repr(k).encode())
                visit(value[k])
            h.update(b"}")
        elif isinstance(value, (list, tuple)) and any(
            isinstance(v, (dict, list, tuple, torch.Tensor)) for v in value
        ):
            h.update(b"[")
            for v in value:
                visit(v)
            h.update(b"]")
        else:  # plain values (and lists of them, e.g. BPE merges) in one go
            h.update(repr(value).encode())

    visit({k: v for k, v in state.items() if k != "checksum"})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for digest in pool.map(_tensor_digest, tensors):
            h.update(digest)
    return h.hexdigest()


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [k for k, t in state_dict.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def history(out_dir: str | Path) -> list[Path]:
    """A run directory's checkpoints, newest first: ``ckpt.pt``, then ``ckpt-STEP.pt`` files and
    ``ckpt-STEP.dcp`` sharded directories by step (ckpt.pt at its own step among sharded ones: a
    sharded run resumed by one process goes on in ckpt.pt)."""
    out = Path(out_dir)
    older = sorted(((int(m.group(1)), p) for p in out.glob("ckpt-*") if (m := HISTORY_RE.match(p.name))
                    and (p.is_dir() if p.suffix == dcp.SUFFIX else p.is_file())), reverse=True)  # fmt: skip
    latest = [out / CKPT_NAME] if (out / CKPT_NAME).exists() else []
    if latest and any(p.suffix == dcp.SUFFIX for _, p in older):
        at = _peek_step(latest[0])
        at = float("inf") if at is None else at  # unreadable: tried first, and reported
        return [p for s, p in older if s > at] + latest + [p for s, p in older if s <= at]
    return latest + [p for _, p in older]


def prune(out_dir: str | Path, keep_last: int) -> None:
    """Remove a run directory's checkpoints beyond the newest ``keep_last`` (ckpt.pt stays while it is
    among them); sharded directories whole."""
    for old in history(out_dir)[max(keep_last, 1) :]:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def _peek_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path`` (memory-mapped: no tensor is read), None if unreadable."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
        return int(step) if step is not None else None
    except Exception:
        return None


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_last: int = 1, check_finite: bool = False
                    ) -> Path:  # fmt: skip
    """Write ``state`` to ``path`` atomically: a crash mid-save leaves the previous file intact.
    With ``keep_last`` > 1 the checkpoint ``path`` held stays as ``ckpt-STEP.pt`` beside it (a hard
    link, so ``path`` exists at every moment), and only the newest ``keep_last`` are kept.
    ``check_finite``: refuse (CheckpointError) weights holding a NaN or an infinity."""
    path = Path(path)
    bad = non_finite_tensors(state.get("model", {})) if check_finite else []
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite weights in {bad[:4]}")
    state = {"format": FORMAT, "version": VERSION, **state}
    state["checksum"] = payload_checksum(state)
    if keep_last > 1 and path.exists() and (old_step := _peek_step(path)) is not None:
        kept = path.with_name(f"{path.stem}-{old_step:07d}{path.suffix}")
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:  # a filesystem without hard links: the newest is briefly only ckpt-STEP.pt
            os.replace(path, kept)
    atomic_write(path, lambda f: torch.save(state, f))
    if path.name == CKPT_NAME:
        prune(path.parent, keep_last)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (file, sharded directory or run directory: its newest) with
    ``weights_only=True``; a sharded one (gpt.dcp) is verified against its manifest and read whole."""
    file = latest_checkpoint(path)
    if dcp.is_sharded(file):
        dcp.verify(file)
        state = _load_file(file / dcp.META, "cpu")
        tensors = dcp.read_tensors(file)
        return {**state, "model": tensors.get("model", {}), "optimizer": tensors.get("optimizer") or None}
    return _load_file(file, map_location)


def _load_file(file: Path, map_location: str | torch.device) -> dict[str, Any]:
    """One torch.save file of the checkpoint schema, read with ``weights_only=True`` and verified."""
    if not file.exists():
        raise CheckpointError(
            f"no checkpoint at {file}: train one first (python train.py out_dir={file.parent}) "
            "or point to an existing run directory"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with disallowed globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.split(r"(?<=\.)\s", first)[0]  # its first whole sentence (torch's advice follows)
        raise CheckpointError(f"checkpoint {file} is corrupt or not a gpt checkpoint ({first}); "
                              "restore it from a backup or train again") from None  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a gpt checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has checkpoint version {state.get('version')}, this code reads version {VERSION}"
        )
    for key in ("model", "model_config", "tokenizer"):
        if key not in state:
            raise CheckpointError(f"checkpoint {file} lacks '{key}'; it is incomplete, train again")
    if "checksum" in state and payload_checksum(state) != state["checksum"]:
        raise CheckpointError(
            f"checkpoint {file} is damaged: its contents do not match the checksum saved with it "
            "(a changed byte on disk or in a copy); use an older checkpoint or train again"
        )
    return state


def load_latest(out_dir: str | Path, warn: Callable[[str], Any] = print) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of a run directory that loads and verifies, and its path; each damaged
    one passed over is reported through ``warn``. Raises the newest one's error if none loads."""
    files = history(out_dir)
    if not files:
        return load_checkpoint(out_dir), checkpoint_path(out_dir)  # raises: no checkpoint
    first: CheckpointError | None = None
    for file in files:
        try:
            state = load_checkpoint(file)
        except CheckpointError as e:
            first = first or e
            warn(f"warning: {e}; trying the previous checkpoint")
            continue
        return state, file
    assert first is not None
    raise first


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
    listed = lambda keys: f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"
    parts = [f"missing keys {listed(missing)}"] if missing else []
    parts += [f"unexpected keys {listed(unexpected)}"] if unexpected else []
    parts += [f"shape mismatches {shapes[:8]}"] if shapes else []
    if parts:
        raise CheckpointError(f"weights in {source} do not match the model: " + "; ".join(parts))


def checkpoint_state(model: dict[str, torch.Tensor], model_config: GPTConfig | dict[str, Any],
                     tokenizer: dict[str, Any], *, optimizer: dict[str, Any] | None = None, step: int = 0,
                     tokens: int = 0, rng: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                     best_val_loss: float | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The one checkpoint schema (see the module docstring): what ``save_checkpoint`` writes.
    ``extra`` holds optional entries such as ``lora``."""
    if isinstance(model_config, GPTConfig):
        model_config = model_config.to_dict()
    state = {"model": model, "model_config": dict(model_config), "tokenizer": tokenizer,
             "optimizer": optimizer, "step": step, "tokens": tokens, "config": config or {},
             "best_val_loss": best_val_loss, **extra}  # fmt: skip
    if rng is not None:
        state["rng"] = rng
    return state
