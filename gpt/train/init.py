"""Where a run's weights start: from scratch, from another model (``init_from``: a run directory, a
checkpoint file, a LoRA run or ``hf:DIR``), or from the run's own checkpoint (``resume=true``).

    start = resolve_start(cfg, out_dir / "ckpt.pt", info)
    start.model_config   # None for a fresh model (its vocab comes from the tokenizer data builds)
    start.weights        # base weights to load, already cut to the block size asked for
    start.lora           # a LoRA run's settings and base (or None); start.adapter its saved adapters
    start.shards         # resuming a sharded checkpoint: its directory (weights None; the trainer
                         # loads it into the wrapped model and optimizer, gpt.train.sharded.load_sharded)

Every start from weights reads them through ``gpt.runs.load.load``. The shape given in the config
must agree with a loaded checkpoint (``block_size`` may only shrink for ``init_from``); the command
line passes only the shape keys the user typed, so a preset's shape never clashes with the
checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.config import TrainRunConfig
from gpt.errors import CheckpointError, ConfigError
from gpt.model import SHAPE_FIELDS, GPTConfig
from gpt.ranks import Ranks
from gpt.runs.load import base_location, load, weights_fingerprint
from gpt.tokenizer import Tokenizer
from gpt.train.distributed import print0
from gpt.train.sharded import resume_point


@dataclass
class Start:
    model_config: GPTConfig | None = None
    weights: dict[str, torch.Tensor] | None = None
    tokenizer: Tokenizer | None = None
    source: str | None = None  # where the weights come from, for messages
    resume_state: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    adapter: dict[str, torch.Tensor] | None = None
    shards: Path | None = None  # a sharded checkpoint resumed: loaded after the model is wrapped


def check_shape(given: dict[str, Any], saved: GPTConfig, source: str) -> None:
    """ConfigError listing every shape key of ``given`` that differs from the checkpoint's."""
    diffs = [
        f"model.{k}={given[k]} (checkpoint: {getattr(saved, k)})"
        for k in (*SHAPE_FIELDS, "block_size")
        if k in given and given[k] != getattr(saved, k)
    ]
    if diffs:
        raise CheckpointError(
            f"the model config does not match the checkpoint {source}: {'; '.join(diffs)}. "
            "Drop these overrides: the shape comes from the checkpoint"
        )


def resolve_start(cfg: TrainRunConfig, ckpt_file: Path, info: Ranks) -> Start:
    """The starting point of the run described by ``cfg`` (see the module docstring); on every rank."""
    given = cfg.model.given()
    if cfg.resume:  # a damaged newest checkpoint is passed over; a LoRA run's base is loaded again
        loaded = resume_point(ckpt_file.parent, print0, info)
    elif cfg.init_from:  # block_size may only shrink; a LoRA run starts from its merged weights
        loaded = load(cfg.init_from, block_size=given.get("block_size"), merge=True)
    else:
        GPTConfig(**given)  # fail fast on an impossible shape, before preparing any data
        loaded = None
    start = Start()
    if loaded is not None:
        check_shape(given, loaded.config, loaded.source)
        resumed = loaded.state if cfg.resume else None
        start = Start(
            loaded.config,
            loaded.weights,
            loaded.tokenizer,
            loaded.source,
            resumed,
            loaded.lora,
            loaded.adapter,
            Path(loaded.source) if cfg.resume and loaded.weights is None else None,
        )
        if "dropout" in given:
            start.model_config.dropout = given["dropout"]
    _prepare_lora(cfg, start, str(ckpt_file))
    return start


def _prepare_lora(cfg: TrainRunConfig, start: Start, source: str) -> None:
    """On resume, check that the LoRA settings are the run's (the loader rebuilt its base into
    ``start.weights`` and kept its adapters in ``start.adapter``); a new LoRA run records its
    settings and base in ``start.lora``."""
    ft, state = cfg.finetune, start.resume_state
    if state is not None:
        spec = start.lora
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
