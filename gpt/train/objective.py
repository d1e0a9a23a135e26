"""Training objectives: what the one loop minimises on a micro-batch, and what its evals report.

- ``LMObjective``: next-token cross-entropy over the targets != -1 (pretraining, fine-tuning, SFT);
  a micro-batch weighs its number of target tokens.
- ``DPOObjective`` (``data.format=pairs``): the preference loss of Direct Preference Optimization
  (Rafailov et al. 2023) or IPO (Azar et al. 2023) on pairs of replies; a micro-batch weighs its
  number of pairs. With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)),
  summed over the reply's tokens:

      sigmoid:  -log sigmoid(beta * h)            ipo:  (h - 1 / (2 beta))^2

  plus ``sft_weight`` times the chosen reply's mean NLL per token. The reference log-probs come
  with the batch (computed once by ``reference_logps`` and cached: see ``gpt.train.reference``), or,
  for LoRA, live from the same model with its adapters switched off.

    objective = make_objective(cfg)
    loss = objective.loss(model, batch, device)       # mean over the micro-batch (tokens or pairs)
    sums, n = objective.eval_sums(model, batch, device, torch.float64)  # evals: sums of .metrics, weight
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from gpt.config import TrainRunConfig
from gpt.lora import LoRALinear
from gpt.stage_config import DPOConfig

DPO_METRICS = ("loss", "reward_acc", "margin", "chosen_logp", "rejected_logp")


def token_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t), 0 where y_t = -1; the mask y != -1): logits (R, T, V), y (R, T) -> two (R, T)
    tensors, the log-probs in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = y != -1
    return logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(y_t) over the targets != -1 of each row, number of those targets): logits
    (R, T, V), y (R, T) -> two (R,) tensors, in fp32."""
    picked, mask = token_logps(logits, y)
    return picked.sum(-1), mask.sum(-1)


def dpo_losses(
    policy: torch.Tensor, ref: torch.Tensor, cfg: DPOConfig, chosen_tokens: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (P,), per-pair metrics) from log-probs ``policy`` and ``ref`` of shape
    (P, 2) = (chosen, rejected), summed over each reply's tokens; ``chosen_tokens`` (P,) counts the
    chosen replies' tokens (needed when ``cfg.sft_weight`` > 0)."""
    ratios = policy - ref.to(policy.dtype)  # (P, 2): log pi / ref of chosen and rejected
    h = ratios[:, 0] - ratios[:, 1]
    # ipo regresses h onto 1 / (2 beta) instead of pushing it to infinity
    losses = -F.logsigmoid(cfg.beta * h) if cfg.loss == "sigmoid" else (h - 1 / (2 * cfg.beta)) ** 2
    if cfg.sft_weight > 0:
        losses = losses - cfg.sft_weight * policy[:, 0] / chosen_tokens.clamp(min=1)
    rewards = cfg.beta * ratios.detach()  # the implicit rewards of DPO
    metrics = {
        "loss": losses.detach(),
        "reward_acc": (rewards[:, 0] > rewards[:, 1]).float(),
        "margin": rewards[:, 0] - rewards[:, 1],
        "chosen_logp": policy[:, 0].detach(),
        "rejected_logp": policy[:, 1].detach(),
    }
    return losses, metrics


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model without its LoRA adapters (their scale set to 0), e.g. as DPO's reference."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales, strict=True):
            m.scale = s


class LMObjective:
    """Mean next-token cross-entropy over the batch's target tokens."""

    metrics: tuple[str, ...] = ("loss",)

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What this micro-batch weighs in the step's mean: its target tokens."""
        return int((batch[1] != -1).sum())

    def eval_sums(self, model, batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """(the loss summed over the micro-batch's target tokens (1,), in ``dtype``; the tokens)."""
        n, loss = self.count(batch), self.loss(model, batch, device)  # the mean over the targets
        # none: the mean is nan (the forward still ran: FSDP gathers weights in it)
        return (loss.to(dtype) * n).reshape(1) if n else torch.zeros(1, dtype=dtype, device=device), n

    def loss(self, model, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        x, y, *rest = (t.to(device, non_blocking=True) for t in batch)
        if rest:  # packed rows: each token's document within its row
            return model(x, y, doc_ids=rest[0])
        return model(x, y)

    def zero_loss(self, model, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        """A zero loss that still runs the forward (and every collective in it)."""
        return model(batch[0].to(device)).float().sum() * 0.0


class DPOObjective:
    """The preference loss on batches of pairs (see the module docstring)."""

    metrics = DPO_METRICS

    def __init__(self, cfg: DPOConfig, live_reference: bool) -> None:
        self.cfg, self.live_reference = cfg, live_reference

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int(batch[2].shape[0])  # pairs

    def pair_metrics(
        self, model, batch: tuple[torch.Tensor, ...], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses, per-pair metrics) of a batch (x, y, ref): x, y (2P, T), ref (P, 2)."""
        x, y, ref = (t.to(device, non_blocking=True) for t in batch)
        P = ref.shape[0]
        if self.live_reference:  # LoRA: the reference is the frozen base, the adapters switched off
            with torch.no_grad(), adapters_off(model):
                ref = sequence_logps(model(x), y)[0].view(2, P).T
        logps, n_tokens = sequence_logps(model(x), y)  # (2P,): the chosen rows first, then the rejected
        return dpo_losses(logps.view(2, P).T, ref, self.cfg, n_tokens[:P])

    def loss(self, model, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        return self.pair_metrics(model, batch, device)[0].mean()

    def eval_sums(self, model, batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """(``metrics`` summed over the micro-batch's pairs (len(metrics),), in ``dtype``; the pairs)."""
        per_pair = self.pair_metrics(model, batch, device)[1]
        return torch.stack([per_pair[k].to(dtype).sum() for k in self.metrics]), self.count(batch)

    def zero_loss(self, model, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        return model(batch[0].to(device)).float().sum() * 0.0


def make_objective(cfg: TrainRunConfig) -> Any:
    """The objective of a run: DPO for preference pairs, else the language-model loss."""
    if cfg.data.format == "pairs":
        return DPOObjective(cfg.dpo, live_reference=cfg.finetune.method == "lora")
    return LMObjective()
