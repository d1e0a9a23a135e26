"""The run's checkpoints as the training loop uses them: writing one (every rank takes part), the
background save still in flight (``train.async_checkpoint``), and reading the newest good one back for
a rollback.

    ckpts = Checkpoints(cfg, info, run, optimizer)
    ckpts.save(out_dir / CKPT_NAME, step, best_val, extra)  # False: non-finite weights, nothing written
    state, used = ckpts.restore()     # weights and optimizer back; the rest of state is the caller's
    ckpts.publish()                   # the background save, finished and published

``gpt.train.loop.Trainer`` decides when (``maybe_save``, ``maybe_rollback``) and what its own state is
(the guard, the GradScaler, GRPO's rollouts: ``extra``); this module writes it with the weights and the
optimizer, as one file rank 0 writes (``gpt.checkpoint``) or as each rank's shards
(``gpt.train.sharded``, ``train.checkpoint_format``), and reads it back. A checkpoint with non-finite
weights is never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import CKPT_NAME, load_latest, non_finite_tensors, save_checkpoint
from gpt.config import TrainRunConfig
from gpt.ranks import Ranks
from gpt.train import distributed as D
from gpt.train import sharded as S
from gpt.train.setup import RunSetup


class Checkpoints:
    """Where a run's checkpoints are written and read back: one file or each rank's shards, and the
    background save in flight. ``run.model`` (unwrapped) and ``optimizer`` are what is saved."""

    def __init__(self, cfg: TrainRunConfig, info: Ranks, run: RunSetup, optimizer: torch.optim.Optimizer):
        self.cfg, self.info, self.run = cfg, info, run
        self.model, self.optimizer = run.model, optimizer
        self.sharded = S.use_sharded(cfg.train, info, run.lora)  # train.checkpoint_format
        background = self.sharded and cfg.train.async_checkpoint  # its own gloo group: every rank
        self.group = S.checkpoint_group(info) if background else None
        self.in_flight: S.SaveInFlight | None = None  # a background save not yet published

    def save(self, path: Path, step: int, best_val: float | None, extra: dict[str, Any]) -> bool:
        """Every rank takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes,
        and the others wait for it, so that no rank exits (and has torchrun stop rank 0) mid-write.
        Returns False (nothing written) when the weights are not finite."""
        sharded = self.sharded and path.name == CKPT_NAME  # best.pt stays one file
        state = self.run.checkpoint_state(self.model, self.optimizer, step, best_val,
                                          weights=not sharded, **extra)  # fmt: skip
        if sharded:
            bad = S.non_finite_local(self.model)
        else:
            bad = non_finite_tensors(state["model"]) if self.info.is_main else []
        if self.info.max([int(bool(bad))])[0]:
            self.run.logger.info(f"step {step}: non-finite weights ({bad[:3]}); {path.name} not written")
            return False
        if sharded:
            self.publish()  # one background save at a time
            keep, background = self.cfg.train.keep_last, self.cfg.train.async_checkpoint
            written = S.save_sharded(path.parent, self.model, self.optimizer, state, self.info, keep,
                                     background, self.group)  # fmt: skip
            self.in_flight = written if isinstance(written, S.SaveInFlight) else None
        elif self.info.is_main:
            keep = self.cfg.train.keep_last if path.name == CKPT_NAME else 1
            save_checkpoint(path, state, keep_last=keep, check_finite=True)
        self.info.wait_all("rank 0 to write the checkpoint")  # a big one may outlast train.timeout_s
        return True

    def publish(self) -> None:
        """Wait for the background save in flight (train.async_checkpoint) and publish it; every rank."""
        if self.in_flight is not None:
            self.in_flight, pending = None, self.in_flight
            pending.finish()

    def restore(self) -> tuple[dict[str, Any], Path]:
        """The newest good checkpoint's weights and optimizer state back into the model and the
        optimizer; returns (its state, the file or directory it came from): the step, the RNG, the
        guard's and the scaler's state are the caller's to restore."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        out_dir = Path(self.cfg.out_dir)
        self.publish()  # the newest checkpoint may still be in flight
        if self.sharded:  # a sharded one: each rank reads the slices of its own shards
            loaded = S.resume_point(out_dir, self.run.logger.info, self.info)
            state, used, shards = loaded.state, Path(loaded.source), loaded.weights is None
        else:  # every rank reads it whole
            (state, used), shards = load_latest(out_dir, warn=self.run.logger.info), False
        if shards:
            S.load_sharded(used, self.model, self.optimizer)
        else:
            options = StateDictOptions(full_state_dict=True, strict=self.run.lora is None)
            set_model_state_dict(self.model, state["model"], options=options)
            if state.get("optimizer") and state["optimizer"].get("state"):
                D.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:  # saved before the first step: a fresh optimizer
                self.optimizer.state.clear()
        return state, used

    def give_up(self, failed: int, reason: str, rollbacks: int) -> str:
        """Log that the run diverged at step ``failed`` after ``rollbacks`` rollbacks; returns the
        message that says what to do (the last good checkpoint is left intact)."""
        self.run.logger.event(
            {"step": failed, "event": "diverged", "reason": reason}, f"step {failed}: {reason}; giving up"
        )
        return (
            f"training diverged at step {failed} ({reason}) and {rollbacks} rollbacks did "
            f"not help; the last good checkpoint in {Path(self.cfg.out_dir)} is intact: lower optim.lr (now "
            f"{self.cfg.optim.lr:g}), raise optim.warmup_steps or set train.rollback_lr_factor=0.5, then "
            "resume=true resume_force=true"
        )
