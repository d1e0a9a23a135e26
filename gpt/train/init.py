"""Where a run's weights start: from scratch, from another model (``init_from``: a run directory, a
checkpoint file, a LoRA run or ``hf:DIR``), or from the run's own checkpoint (``resume=true``).

    start = resolve_start(cfg, out_dir / "ckpt.pt")
    start.model_config   # None for a fresh model (its vocab comes from the tokenizer data builds)
    start.weights        # base weights to load, already cut to the block size asked for
    start.lora           # a LoRA run's settings and base (or None); start.adapter its saved adapters

The shape given in the config must agree with a loaded checkpoint (``block_size`` may only shrink
for ``init_from``); the command line passes only the shape keys the user typed, so a preset's shape
never clashes with the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import load_latest, model_config_from
from gpt.config import TrainRunConfig
from gpt.errors import CheckpointError, ConfigError
from gpt.model import SHAPE_FIELDS, GPTConfig, crop_block_size
from gpt.runs.load import base_location, base_weights, load_base, weights_fingerprint
from gpt.tokenizer import Tokenizer, tokenizer_from_state
from gpt.train.distributed import print0


@dataclass
class Start:
    model_config: GPTConfig | None = None
    weights: dict[str, torch.Tensor] | None = None
    tokenizer: Tokenizer | None = None
    source: str | None = None  # where the weights come from, for messages
    resume_state: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    adapter: dict[str, torch.Tensor] | None = None


def check_shape(given: dict[str, Any], saved: GPTConfig, source: str, allow_shorter: bool) -> None:
    """ConfigError listing every shape key of ``given`` that differs from the checkpoint's."""
    diffs = [
        f"model.{k}={given[k]} (checkpoint: {getattr(saved, k)})"
        for k in SHAPE_FIELDS
        if k in given and given[k] != getattr(saved, k)
    ]
    bs = given.get("block_size")
    if bs is not None and (bs > saved.block_size or (bs != saved.block_size and not allow_shorter)):
        diffs.append(
            f"model.block_size={bs} (checkpoint: {saved.block_size}"
            f"{', it may only shrink' if allow_shorter else ''})"
        )
    if diffs:
        raise CheckpointError(
            f"the model config does not match the checkpoint {source}: {'; '.join(diffs)}. "
            "Drop these overrides: the shape comes from the checkpoint"
        )


def resolve_start(cfg: TrainRunConfig, ckpt_file: Path) -> Start:
    """The starting point of the run described by ``cfg`` (see the module docstring)."""
    given = cfg.model.given()
    if cfg.resume:
        state, used = load_latest(ckpt_file.parent, warn=print0)  # a damaged newest one is passed over
        config = model_config_from(state)
        check_shape(given, config, str(used), allow_shorter=False)
        tok = tokenizer_from_state(state["tokenizer"])
        start = Start(config, state["model"], tok, str(used), resume_state=state)
    elif cfg.init_from:
        config, weights, tok, source = load_base(cfg.init_from)
        check_shape(given, config, source, allow_shorter=True)
        if given.get("block_size") and given["block_size"] < config.block_size:
            config.block_size = given["block_size"]
            weights = crop_block_size(weights, config.block_size)
        start = Start(config, weights, tok, source)
    else:
        GPTConfig(**given)  # fail fast on an impossible shape, before preparing any data
        start = Start()
    if "dropout" in given and start.model_config is not None:
        start.model_config.dropout = given["dropout"]
    _prepare_lora(cfg, start, str(ckpt_file))
    return start


def _prepare_lora(cfg: TrainRunConfig, start: Start, source: str) -> None:
    """Fill ``start.lora`` (and, on resume, reload the base into ``start.weights`` and keep the saved
    adapters in ``start.adapter``). A new LoRA run records its settings and base."""
    ft, state = cfg.finetune, start.resume_state
    if state is not None:
        spec = state.get("lora")
        if spec is None:
            if ft.method == "lora":
                raise ConfigError(f"{source} is not a LoRA run: resume it with finetune.method=full")
            return
        if ft.method != "lora":
            raise ConfigError(f"{source} is a LoRA run: resume it with finetune.method=lora")
        diffs = [
            f"finetune.lora_{k}={getattr(ft, 'lora_' + k)} (checkpoint: {spec[k]})"
            for k in ("rank", "alpha", "dropout", "targets")
            if getattr(ft, "lora_" + k) != spec[k]
        ]
        if diffs:
            raise ConfigError(f"the LoRA settings differ from the run being resumed: {'; '.join(diffs)}")
        start.lora, start.adapter = spec, start.weights
        start.weights = base_weights(spec, start.model_config, source)
        return
    if ft.method != "lora":
        return
    if start.weights is None:
        raise ConfigError(
            "finetune.method=lora adapts an existing model: set init_from=DIR (a run directory) or "
            "init_from=hf:DIR (a Hugging Face GPT-2 directory)"
        )
    start.lora = {
        "rank": ft.lora_rank,
        "alpha": ft.lora_alpha,
        "dropout": ft.lora_dropout,
        "targets": list(ft.lora_targets),
        "base": cfg.init_from,  # as given, and resolved: found from any working directory
        "base_path": base_location(cfg.init_from),
        "base_fingerprint": weights_fingerprint(start.weights),
    }
