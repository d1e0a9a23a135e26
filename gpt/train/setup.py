"""Everything a training run needs before its first step: the run directory, the tokenizer, the
data sources, the model (from scratch, from ``init_from``, or resumed: see ``gpt.train.init``), and
the monitor.

Three ways in, one result (``RunSetup``):
- fresh:      the tokenizer is built by data preparation; the model shape comes from ``cfg.model``;
- init_from:  weights, shape and tokenizer come from another run (or ``hf:DIR``); ``block_size``
              may shrink, and any shape the config sets must match the checkpoint;
- resume:     everything (weights, optimizer, step, RNG, guard, GradScaler) comes from the newest
              checkpoint of ``out_dir`` that verifies; the settings that define the run (its
              ``fingerprint``: data, tokenizer, seed, batch, optimizer, dtype, fine-tuning) must be
              the saved ones unless ``resume_force=true``; intervals and ``train.max_steps`` may change.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml  # PyYAML comes with hydra-core/omegaconf

from gpt.atomic import atomic_write
from gpt.checkpoint import CKPT_NAME, checkpoint_path, checkpoint_state, history, load_state_dict_strict
from gpt.config import TrainRunConfig
from gpt.data.preference import pair_sources
from gpt.data.prepare import prepare
from gpt.data.prompts import prompt_sources
from gpt.data.sft import dialog_sources
from gpt.data.shards import TokenWindows
from gpt.errors import CheckpointError, ConfigError
from gpt.lora import adapter_weights, attach, describe
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.ranks import Ranks
from gpt.train import distributed as D
from gpt.train.init import Start, resolve_start
from gpt.train.monitor import Monitor
from gpt.train.reference import attach_reference
from gpt.train.rundir import replace_run
from gpt.typed_config import resolve_path


def run_fingerprint(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """The settings that define a run, flat (``data.path``: value): every config field but those
    marked ``RESUMABLE`` (``gpt.config``); a resume must keep them."""
    flat: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("resumable"):
            continue
        if is_dataclass(value):
            flat.update(run_fingerprint(value, f"{prefix}{f.name}."))
        else:
            flat[prefix + f.name] = copy.deepcopy(value)
    return flat


def check_fingerprint(saved: dict[str, Any] | None, cfg: TrainRunConfig, source: str) -> str | None:
    """ConfigError listing the defining settings that differ from the checkpoint's (none saved: an
    older checkpoint, accepted); with ``resume_force=true`` the notice to log instead."""
    if not saved:
        return None
    now = run_fingerprint(cfg)
    diffs = [
        f"{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if not diffs:
        return None
    if cfg.resume_force:
        return f"resume_force=true: continuing {source} with changed settings: {'; '.join(diffs)}"
    raise ConfigError(
        f"resume=true: {source} was trained with other settings: {'; '.join(diffs)}; "
        "restore them, or set resume_force=true to continue with the new ones"
    )


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
    guard_state: dict | None = None  # the numerical guard's (see gpt.train.guard)
    scaler_state: dict | None = None  # the fp16 GradScaler's
    objective_state: dict | None = None  # GRPO's rollouts in use (see gpt.train.grpo)
    lora: dict[str, Any] | None = None  # a LoRA run's settings and base (see gpt.train.init)
    shards: Path | None = None  # a sharded checkpoint resumed: the trainer loads it after wrapping
    dist: Ranks = field(default_factory=Ranks)  # this process's rank and device
    fingerprint: dict[str, Any] = field(default_factory=dict)  # see run_fingerprint

    def checkpoint_state(
        self, model: GPT, optimizer, step: int, best_val: float | None, weights: bool = True, **extra: Any
    ) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, step, RNG, config, tokenizer.
        The data position is the step itself (plus the guard's offset after a rollback, in
        ``extra["guard"]``): batches are a pure function of (seed, step).
        Call it on every rank (FSDP gathers the shards); the result is complete on rank 0.
        ``weights=False``: all but the model and optimizer state (a sharded save writes those)."""
        model_sd, optim_sd = D.full_state_dicts(model, optimizer, self.dist) if weights else ({}, None)
        extra["fingerprint"] = self.fingerprint
        if self.lora is not None:  # adapters only: the frozen base is loaded again from lora["base"]
            model_sd, extra["lora"] = adapter_weights(model_sd), self.lora
        return checkpoint_state(
            model_sd,
            model.config,
            self.tokenizer.to_state(),
            optimizer=optim_sd,
            step=step,
            tokens=step * self.config_dict["train"]["batch_size"] * self.block_size,
            rng=D.rng_state(self.dist),
            config=self.config_dict,
            best_val_loss=best_val,
            **extra,
        )


def _build_data(cfg: TrainRunConfig, tokenizer, block_size: int, info: Ranks):
    """Prepare and return (tokenizer, train, train_eval, val) batch sources: text is prepared by all
    ranks together (each tokenizes its share of the corpus, see gpt.data.prepare); dialogs on rank 0
    first, the others then hit its cache (see Ranks.main_first)."""
    if cfg.data.format in ("dialogs", "pairs", "prompts"):

        def make():
            if cfg.data.format == "prompts":
                return prompt_sources(cfg.data, tokenizer, block_size, cfg.seed, cfg.grpo.epochs,
                                      cfg.grpo.max_new_tokens, show_progress=info.is_main)  # fmt: skip
            if cfg.data.format == "pairs":
                return pair_sources(cfg.data, tokenizer, block_size, cfg.seed, show_progress=info.is_main)
            return dialog_sources(cfg.data, tokenizer, block_size, cfg.seed, show_progress=info.is_main,
                                  batch_size=cfg.train.batch_size)  # fmt: skip

        return info.main_first(make)
    prepared = prepare(cfg.data, block_size, tokenizer, show_progress=info.is_main, ranks=info)
    train = TokenWindows(prepared.train_shards, block_size, cfg.seed)
    train_eval = TokenWindows(prepared.train_shards, block_size, cfg.seed + 1)
    val = TokenWindows(prepared.val_shards, block_size, cfg.seed + 2) if prepared.val_shards else None
    return prepared.tokenizer, train, train_eval, val


def _rank_fingerprint(cfg: TrainRunConfig, tokenizer, train_data) -> str:
    """What must agree across ranks: the run's settings, the tokenizer, the data (its first batch)."""
    h = hashlib.sha256(json.dumps(run_fingerprint(cfg), sort_keys=True, default=str).encode())
    h.update(tokenizer.fingerprint().encode())
    for t in train_data.get(0, cfg.train.batch_size, 0, cfg.train.batch_size):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _check_not_inside_base(cfg: TrainRunConfig, out_dir: Path) -> None:
    """out_dir must not be (or lie inside) the run ``init_from`` reads: overwrite=true would move the
    only copy of the base aside and delete it before it is read."""
    if not cfg.init_from:
        return
    ref = cfg.init_from[3:] if cfg.init_from.startswith("hf:") else cfg.init_from
    base = resolve_path(ref)
    if not cfg.init_from.startswith("hf:") and not base.is_dir():
        base = checkpoint_path(base).parent  # a checkpoint file: its run directory
    base, out = base.resolve(), out_dir.resolve()
    if out == base or base in out.parents:
        raise ConfigError(
            f"out_dir={cfg.out_dir} is the run init_from={cfg.init_from} starts from (or lies inside "
            "it); the new run would replace its checkpoint: choose another out_dir"
        )


def _check_out_dir(cfg: TrainRunConfig, ckpt_file: Path) -> None:
    _check_not_inside_base(cfg, ckpt_file.parent)
    if cfg.resume and not history(ckpt_file.parent):
        raise CheckpointError(
            f"resume=true but {ckpt_file} does not exist; start the run without resume=true"
        )
    if not cfg.resume and history(ckpt_file.parent) and not cfg.overwrite:
        raise ConfigError(
            f"out_dir={ckpt_file.parent} already holds a checkpoint; continue it with resume=true, choose "
            "another out_dir, or replace it with overwrite=true"
        )
    if cfg.resume and cfg.init_from:
        raise ConfigError("resume=true and init_from are exclusive: resume continues out_dir itself")


def _build_model(cfg: TrainRunConfig, start: Start, tokenizer, info: Ranks) -> GPT:
    """The model with its starting weights (and LoRA adapters); the same initial weights on every
    rank, then a per-rank RNG so that dropout differs between ranks."""
    config = start.model_config
    if config is None:
        config = GPTConfig(**{**cfg.model.given(), "vocab_size": pad_vocab(tokenizer.vocab_size)})
    elif config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"the checkpoint's vocab_size={config.vocab_size} is smaller than its tokenizer's "
            f"{tokenizer.vocab_size}; the checkpoint is inconsistent"
        )
    torch.manual_seed(cfg.seed)
    model = GPT(config)
    if start.weights is not None:
        load_state_dict_strict(model, start.weights, start.source or cfg.out_dir)
    if start.lora is not None:
        attach(model, start.lora, start.adapter, start.source or cfg.out_dir)
    torch.manual_seed(cfg.seed + info.rank)
    return model


def _monitor(cfg: TrainRunConfig, info: Ranks, model: GPT, tokenizer, step: int, config_dict: dict[str, Any],
             notices: list[str | None]) -> Monitor:  # fmt: skip
    """The run's monitor, its log opened with the model and the ``notices`` that apply (None: not)."""
    resume_step = step if cfg.resume else None
    logger = Monitor(cfg, info, Path(cfg.out_dir), resume_step=resume_step, config=config_dict)
    logger.info(
        f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} "
        f"MFLOP/token, block_size={model.config.block_size}, vocab={model.config.vocab_size} (tokenizer "
        f"{tokenizer.kind}, {tokenizer.vocab_size}); device={info.device}, world={info.world_size}"
    )
    for notice in notices:
        if notice:
            logger.info(notice)
    return logger


def setup_run(cfg: TrainRunConfig, info: Ranks) -> RunSetup:
    """Everything the run needs before its first step (see the module docstring)."""
    out_dir = Path(cfg.out_dir)
    ckpt_file = out_dir / CKPT_NAME
    _check_out_dir(cfg, ckpt_file)
    if cfg.overwrite and not cfg.resume and info.is_main and out_dir.is_dir():
        replace_run(out_dir)  # before anything of the new run is written: never two runs in one directory
    start = resolve_start(cfg, ckpt_file, info)
    state = start.resume_state or {}
    forced = check_fingerprint(state.get("fingerprint"), cfg, start.source or str(ckpt_file))
    config = start.model_config
    block_size = config.block_size if config else cfg.model.given().get("block_size", GPTConfig.block_size)
    tokenizer, train_data, train_eval, val_data = _build_data(cfg, start.tokenizer, block_size, info)
    info.check_same(_rank_fingerprint(cfg, tokenizer, train_data), "data, tokenizer or settings")
    model = _build_model(cfg, start, tokenizer, info)

    config_dict = cfg.to_dict()
    config_dict["model"] = model.config.to_dict()  # record the shape actually trained
    step = int(state.get("step", 0))
    if start.resume_state is not None:
        D.restore_rng(state.get("rng", {}), info, cfg.seed, step)
    if info.is_main:
        atomic_write(out_dir / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        tokenizer.save(out_dir)
    reference = None
    if cfg.data.format == "pairs" and start.lora is None:  # LoRA: the base without adapters, live
        sources = (train_data, train_eval, val_data)
        reference = attach_reference(
            cfg, model, sources, out_dir, info, resume=start.resume_state is not None
        )
    notices = [
        describe(model, start.lora) if start.lora is not None else None,
        reference,
        f"resuming {start.source} at step {step}" if start.resume_state is not None else None,
        forced,
    ]
    return RunSetup(
        model=model,
        tokenizer=tokenizer,
        block_size=model.config.block_size,
        train_data=train_data,
        train_eval=train_eval,
        val_data=val_data,
        logger=_monitor(cfg, info, model, tokenizer, step, config_dict, notices),
        config_dict=config_dict,
        step=step,
        best_val_loss=state.get("best_val_loss"),
        optimizer_state=state.get("optimizer"),
        guard_state=state.get("guard"),
        scaler_state=state.get("scaler"),
        objective_state=state.get("objective"),
        lora=start.lora,
        shards=start.shards,
        dist=info,
        fingerprint=run_fingerprint(cfg),
    )
