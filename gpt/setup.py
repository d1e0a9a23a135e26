"""Everything a training run needs before its first step: the run directory, the tokenizer, the
data sources, the model (from scratch, from ``init_from``, or resumed), and the monitor.

Three ways in, one result (``RunSetup``):
- fresh:      the tokenizer is built by data preparation; the model shape comes from ``cfg.model``;
- init_from:  weights, shape and tokenizer come from another run (or ``hf:DIR``); ``block_size``
              may shrink, and any shape the config sets must match the checkpoint;
- resume:     everything (weights, optimizer, step, RNG) comes from ``out_dir/ckpt.pt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt import distributed as D
from gpt.checkpoint import CKPT_NAME, load_base, load_checkpoint, load_state_dict_strict
from gpt.config import TrainRunConfig
from gpt.errors import CheckpointError, ConfigError
from gpt.lora import attach, describe, prepare_lora
from gpt.model import GPT, GPTConfig
from gpt.monitor import Monitor

# fields that define the weights' shapes and meaning: they must agree with a loaded checkpoint
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "mlp_ratio", "bias", "norm", "pos_emb", "tie_embeddings")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up: matmuls with a multiple-of-64 dimension are markedly faster."""
    return (n + multiple - 1) // multiple * multiple


@dataclass
class RunSetup:
    model: GPT
    tokenizer: Any
    block_size: int
    train_data: Any  # .get(step, batch_size, start, count) -> (x, y)
    train_eval: Any  # fixed windows of the train split, for the train_loss of evals
    val_data: Any | None
    logger: Monitor
    config_dict: dict[str, Any]
    step: int = 0
    best_val_loss: float | None = None
    optimizer_state: dict | None = None
    lora: dict[str, Any] | None = None  # a LoRA run's settings and base model (see gpt.lora)
    dist: D.DistInfo = field(default_factory=D.DistInfo)  # this process's rank and device

    def checkpoint_state(self, model: GPT, optimizer, step: int, best_val: float | None) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, step, RNG, config, tokenizer.
        The data position is the step itself: batches are a pure function of (seed, step).
        Call it on every rank (FSDP gathers the shards); the result is complete on rank 0."""
        model_sd, optim_sd = D.full_state_dicts(model, optimizer, self.dist)
        extra = {}
        if self.lora is not None:  # adapters only: the frozen base is loaded again from lora["base"]
            from gpt.lora import adapter_weights

            model_sd, extra = adapter_weights(model_sd), {"lora": self.lora}
        rng = D.rng_state(self.dist)
        return {
            "model": model_sd,
            "model_config": model.config.to_dict(),
            "tokenizer": self.tokenizer.to_state(),
            "optimizer": optim_sd,
            "step": step,
            "tokens": step * self.config_dict["train"]["batch_size"] * self.block_size,
            "rng": rng,
            "config": self.config_dict,
            "best_val_loss": best_val,
            **extra,
        }


def _check_shape(given: dict[str, Any], saved: GPTConfig, source: str, allow_shorter: bool) -> None:
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
            "Drop these overrides (use model=init to take the shape from the checkpoint)"
        )


def _build_data(cfg: TrainRunConfig, tokenizer, block_size: int, info: D.DistInfo):
    """Prepare (rank 0 first, the others then hit its cache: see D.main_first) and return the batch
    sources."""
    if cfg.data.format == "dialogs":
        from gpt.chat import dialog_sources

        make = lambda: dialog_sources(
            cfg.data,
            tokenizer,
            block_size,
            cfg.seed,
            show_progress=info.is_main,
            batch_size=cfg.train.batch_size,
        )
    else:
        from gpt.data import TokenWindows, prepare

        def make():
            prepared = prepare(cfg.data, block_size, tokenizer, show_progress=info.is_main)
            train = TokenWindows(prepared.train_shards, block_size, cfg.seed)
            train_eval = TokenWindows(prepared.train_shards, block_size, cfg.seed + 1)
            val = TokenWindows(prepared.val_shards, block_size, cfg.seed + 2) if prepared.val_shards else None
            return prepared.tokenizer, train, train_eval, val

    return D.main_first(make, info)


def setup_run(cfg: TrainRunConfig, info: D.DistInfo) -> RunSetup:
    out_dir = Path(cfg.out_dir)
    ckpt_file = out_dir / CKPT_NAME
    if cfg.resume and not ckpt_file.exists():
        raise CheckpointError(
            f"resume=true but {ckpt_file} does not exist; start the run without resume=true"
        )
    if not cfg.resume and ckpt_file.exists() and not cfg.overwrite:
        raise ConfigError(
            f"out_dir={out_dir} already holds a checkpoint; continue it with resume=true, choose another "
            "out_dir, or replace it with overwrite=true"
        )
    if cfg.resume and cfg.init_from:
        raise ConfigError("resume=true and init_from are exclusive: resume continues out_dir itself")

    given = cfg.model.given()
    tokenizer, weights, resume_state = None, None, None
    if cfg.resume:
        from gpt.tokenizer import tokenizer_from_state

        resume_state = load_checkpoint(ckpt_file)
        model_config = GPTConfig.from_dict(dict(resume_state["model_config"]))
        _check_shape(given, model_config, str(ckpt_file), allow_shorter=False)
        tokenizer, weights = tokenizer_from_state(resume_state["tokenizer"]), resume_state["model"]
    elif cfg.init_from:
        model_config, weights, tokenizer, source = load_base(cfg.init_from)
        _check_shape(given, model_config, source, allow_shorter=True)
        if given.get("block_size") and given["block_size"] < model_config.block_size:
            model_config.block_size = given["block_size"]
            if "transformer.wpe.weight" in weights:
                weights = {
                    **weights,
                    "transformer.wpe.weight": weights["transformer.wpe.weight"][: given["block_size"]],
                }
    else:
        model_config = None
        GPTConfig(**given)  # fail fast on an impossible shape, before preparing any data
    if "dropout" in given and model_config is not None:
        model_config.dropout = given["dropout"]
    # LoRA: the base weights load now, the adapters once the model exists
    lora, weights, adapter = prepare_lora(cfg, resume_state, model_config, weights, str(ckpt_file))

    block_size = model_config.block_size if model_config else given.get("block_size", GPTConfig.block_size)
    tokenizer, train_data, train_eval, val_data = _build_data(cfg, tokenizer, block_size, info)
    if model_config is None:
        model_config = GPTConfig(**{**given, "vocab_size": pad_vocab(tokenizer.vocab_size)})
    elif model_config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"the checkpoint's vocab_size={model_config.vocab_size} is smaller than its tokenizer's "
            f"{tokenizer.vocab_size}; the checkpoint is inconsistent"
        )

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_config)
    if weights is not None:
        load_state_dict_strict(model, weights, cfg.init_from or str(ckpt_file))
    if lora is not None:
        attach(model, lora, adapter, str(ckpt_file))
    torch.manual_seed(cfg.seed + info.rank)  # dropout differs per rank

    config_dict = cfg.to_dict()
    config_dict["model"] = model_config.to_dict()  # record the shape actually trained
    step = 0
    if resume_state is not None:
        step = int(resume_state["step"])
        D.restore_rng(resume_state.get("rng", {}), info, cfg.seed, step)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(out_dir, config_dict, tokenizer)
    logger = Monitor(cfg, info, out_dir, resume_step=step if cfg.resume else None, config=config_dict)
    logger.info(
        f"model: {model.num_params() / 1e6:.2f}M parameters, "
        f"{model.flops_per_token() / 1e6:.1f} MFLOP/token, "
        f"block_size={model_config.block_size}, vocab={model_config.vocab_size} "
        f"(tokenizer {tokenizer.kind}, {tokenizer.vocab_size}); device={info.device}, world={info.world_size}"
    )
    if lora is not None:
        logger.info(describe(model, lora))
    if resume_state is not None:
        logger.info(f"resuming {ckpt_file} at step {step}")
    return RunSetup(
        model=model,
        tokenizer=tokenizer,
        block_size=model_config.block_size,
        train_data=train_data,
        train_eval=train_eval,
        val_data=val_data,
        logger=logger,
        config_dict=config_dict,
        step=step,
        best_val_loss=resume_state.get("best_val_loss") if resume_state else None,
        optimizer_state=resume_state.get("optimizer") if resume_state else None,
        lora=lora,
        dist=info,
    )


def _write_run_files(out_dir: Path, config_dict: dict[str, Any], tokenizer) -> None:
    """The resolved config (YAML) and the tokenizer, beside the checkpoint."""
    import yaml  # PyYAML comes with hydra-core/omegaconf

    (out_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    tokenizer.save(out_dir)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (for plots, comparisons and tests)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
