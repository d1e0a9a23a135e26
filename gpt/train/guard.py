"""The numerical guard of a run: which steps are skipped and when the run rolls back.

Per step the loop hands over the step's loss and whether any rank saw a non-finite loss or gradient
norm (agreed over ranks), and gets a verdict:

- ``"ok"``: the optimizer steps;
- ``"skip"``: no update (the step still counts and its batch is consumed);
- ``"rollback"``: ``train.max_bad_steps`` skipped steps in a row, or a loss spike (above the mean +
  ``train.spike_std`` standard deviations of the last ``train.spike_window`` good steps): the loop
  goes back to the last good checkpoint (see ``Trainer.rollback``).

    guard = Guard(cfg.train, saved)       # saved: the checkpoint's "guard" entry, or None
    verdict = guard.check(loss, bad)

Its state (the data offset that moves a rolled-back run past the batches that failed, the learning
rate scale, the rollback count, the recent losses) travels in every checkpoint, so a resumed run
decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gpt.config import TrainConfig


class Guard:
    def __init__(self, cfg: TrainConfig, saved: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        saved = saved or {}
        self.data_offset = int(saved.get("data_offset", 0))  # batch index = step + data_offset
        self.lr_scale = float(saved.get("lr_scale", 1.0))
        self.rollbacks = int(saved.get("rollbacks", 0))  # in a row: reset by a save past the failure
        self.failed_at = int(saved.get("failed_at", -1))  # step of the last failure
        self.losses: deque[float] = deque(saved.get("losses", []), maxlen=cfg.spike_window)
        self.bad_in_a_row = 0
        self.reason = ""

    def state(self) -> dict[str, Any]:
        return {
            "data_offset": self.data_offset,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "failed_at": self.failed_at,
            "losses": list(self.losses),
        }

    def spike(self, loss: float) -> bool:
        if self.cfg.spike_std <= 0 or len(self.losses) < self.losses.maxlen:
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((v - mean) ** 2 for v in self.losses) / len(self.losses))
        return loss > mean + self.cfg.spike_std * std

    def check(self, loss: float, bad: bool) -> str:
        """The verdict on one step (see the module docstring); ``self.reason`` says why."""
        if bad or not math.isfinite(loss):
            self.bad_in_a_row += 1
            self.reason = f"non-finite loss or gradient norm ({self.bad_in_a_row} in a row)"
            return "rollback" if self.bad_in_a_row >= self.cfg.max_bad_steps else "skip"
        if self.spike(loss):
            mean = sum(self.losses) / len(self.losses)
            self.reason = f"loss spike {loss:.4f} (mean of the last {len(self.losses)} steps {mean:.4f})"
            return "rollback"
        self.bad_in_a_row = 0
        self.losses.append(loss)
        return "ok"

    def rolled_back(self, failed_step: int, to_step: int, saved: dict[str, Any] | None) -> None:
        """Back at checkpoint step ``to_step`` (its guard state ``saved``) after step ``failed_step``
        failed: the run goes on with the batches after the failed one, at a lower LR if asked."""
        batch_index = failed_step + self.data_offset
        self.losses = Guard(self.cfg, saved).losses
        self.data_offset = batch_index + 1 - to_step
        self.lr_scale *= self.cfg.rollback_lr_factor
        self.rollbacks += 1
        self.failed_at = failed_step
        self.bad_in_a_row = 0

    def saved(self, step: int) -> None:
        """A checkpoint at ``step`` was written: past the last failure, rollbacks are forgiven."""
        if step > self.failed_at:
            self.rollbacks = 0
