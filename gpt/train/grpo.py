"""GRPO (Shao et al. 2024, DeepSeekMath): reinforcement learning from rewards a program checks, as
the objective of the one training loop (``experiment=grpo``, ``data.format=prompts``).

Per rollout batch (``step // grpo.epochs``) each prompt gets G = ``grpo.group_size`` replies sampled
by the engine (``gpt.infer.generate.sample_batch``: the batch's prompts x G rows decoded together,
stopped at the end-of-turn token), each reply a reward (``gpt.train.rewards``), and each reply's
tokens the advantage of its reply against its group, A = (r - mean) / (std + 1e-4). The loss is
TRL's token-level clipped one,

    loss = mean over completion tokens of  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
                                           + kl_coef * (exp(ref - logp) - (ref - logp) - 1)    (k3)

with ratio = pi / pi_old (pi_old: the policy that sampled; 1 when ``grpo.epochs`` = 1). The
reference is the initial model: with LoRA the base with the adapters off, else a frozen copy.

Resume is exact: each prompt's sampling generator is seeded by (seed, rollout batch, position), and
the rollouts in use (needed when a run stops between the epochs of one batch) go into the checkpoint
(``state`` / ``load_state``). Evals decode greedily and report the reward, its std over prompts, the
exact-answer accuracy, the KL to the reference (per token) and the reply length (tokens).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt.config import TrainRunConfig
from gpt.data.prompts import PromptBatch
from gpt.infer.config import GenerationConfig
from gpt.infer.generate import greedy_batch, sample_batch
from gpt.runs.load import load
from gpt.tokenizer import EOT_TURN
from gpt.train.objective import adapters_off, token_logps
from gpt.train.rewards import Rewards, exact


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: each reward against its group's mean and std."""
    mean, std = rewards.mean(-1, keepdim=True), rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


def clipped_token_losses(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, clip_eps: float,
                         ref: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-token losses (R, T) from log-probs logp, old, ref (R, T) and advantages adv (R,)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].to(logp.dtype)
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if ref is not None and kl_coef > 0:
        loss = loss + kl_coef * k3(logp, ref)
    return loss


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || ref) per token (Schulman 2020): unbiased, always >= 0."""
    d = ref - logp
    return torch.exp(d) - d - 1


@dataclass
class Rollout:
    x: torch.Tensor  # (R, L) prompt + reply, R = prompts x G, right-padded
    y: torch.Tensor  # (R, L) the reply's tokens as targets, -1 elsewhere
    adv: torch.Tensor  # (R,)
    old: torch.Tensor | None  # (R, L) log pi_old of the targets (grpo.epochs > 1)
    ref: torch.Tensor | None  # (R, L) log ref of the targets (grpo.kl_coef > 0)


def pack(prompts: list[list[int]], replies: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (R, L) for each prompt + reply: the reply's tokens are the only targets."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True)) - 1
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    y = torch.full((len(prompts), width), -1, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        seq = torch.tensor(p + r)
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1 : len(seq) - 1] = seq[len(p) :]
    return x, y


class GRPOObjective:
    """The GRPO loss on batches of prompts (see the module docstring); the loop's interface."""

    def __init__(self, cfg: TrainRunConfig, model: torch.nn.Module, tokenizer, step: int) -> None:
        self.cfg, self.g, self.raw, self.tokenizer = cfg, cfg.grpo, model, tokenizer
        self.rewards = Rewards(cfg.grpo.rewards, cfg.grpo.reward_weights)
        self.turn_end = tokenizer.special_id(EOT_TURN)
        self.lora = cfg.finetune.method == "lora"
        self.init_from = cfg.init_from
        self.reference: torch.nn.Module | None = None  # a full fine-tune's frozen initial model
        if cfg.grpo.kl_coef > 0 and not self.lora and step == 0:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.has_reference = self.lora or cfg.grpo.kl_coef > 0
        self.metrics = ("loss", "reward", "reward_sq", "accuracy", "length") + ("kl",) * self.has_reference
        self.rollouts: dict[tuple[int, int], Rollout] = {}

    # ------------------------------------------------------------------ the rollouts
    def ref_context(self, model):
        return adapters_off(model) if self.lora else nullcontext()

    @torch.no_grad()
    def target_logps(self, model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
        return token_logps(model(x.to(device)), y.to(device))[0].float().cpu()

    def rollout(self, batch: PromptBatch, device: torch.device) -> Rollout:
        """G sampled replies per prompt, their rewards and advantages (and pi_old, ref log-probs)."""
        g, (rollout, start) = self.g, batch.key
        settings = GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=0)
        # every prompt's G rows in one batch (those of equal length decode together), each prompt's
        # rows drawing from its own generator: the same samples as decoding the prompts one by one
        records = [p for p in batch.prompts for _ in range(g.group_size)]
        prompts = [p.ids for p in records]
        generators = []
        for i in range(len(batch.prompts)):
            seed = int(np.random.SeedSequence([self.cfg.seed, rollout, start + i]).generate_state(1)[0])
            generators += [torch.Generator(device=device).manual_seed(seed)] * g.group_size
        done = sample_batch(self.raw, self.tokenizer, prompts, settings, generators, batch_size=len(prompts),
                            stop_token_ids=[self.turn_end])  # fmt: skip
        replies = [c.ids + [self.turn_end] * (c.finish_reason == "stop") for c in done]
        rewards = [self.rewards(p, c.text) for p, c in zip(records, done, strict=True)]
        x, y = pack(prompts, replies, self.tokenizer.eot_id)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, g.group_size)).flatten()
        old = self.target_logps(self.raw, x, y, device) if g.epochs > 1 else None
        ref = None
        if g.kl_coef > 0:
            ref_model = self.raw if self.lora else self.reference_model(device)
            with self.ref_context(ref_model):
                ref = self.target_logps(ref_model, x, y, device)
        return Rollout(x, y, adv.float(), old, ref)

    def reference_model(self, device: torch.device) -> torch.nn.Module:
        """The frozen initial model of a full fine-tune; after a resume, loaded again from init_from."""
        if self.reference is None:
            block = self.raw.config.block_size
            self.reference = load(self.init_from, block_size=block, merge=True).build(device).eval()
        return self.reference

    def get(self, batch: PromptBatch, device: torch.device) -> Rollout:
        """This micro-batch's rollouts, sampled at the first optimizer step of its rollout batch."""
        if batch.key not in self.rollouts:
            self.rollouts = {k: v for k, v in self.rollouts.items() if k[0] == batch.key[0]}
            self.rollouts[batch.key] = self.rollout(batch, device)
        return self.rollouts[batch.key]

    # ------------------------------------------------------------------ the loop's interface
    def count(self, batch: PromptBatch) -> int:
        """What this micro-batch weighs in the step's mean: its replies' tokens (sampling them)."""
        return int((self.get(batch, self.raw.lm_head.weight.device).y != -1).sum())

    def loss(self, model, batch: PromptBatch, device: torch.device) -> torch.Tensor:
        r = self.get(batch, device)
        y = r.y.to(device)
        logp, mask = token_logps(model(r.x.to(device)), y)
        old = r.old.to(device) if r.old is not None else logp.detach()
        ref = r.ref.to(device) if r.ref is not None else None
        losses = clipped_token_losses(logp, old, r.adv.to(device), self.g.clip_eps, ref, self.g.kl_coef)
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    def zero_loss(self, model, batch: PromptBatch, device: torch.device) -> torch.Tensor:
        r = self.get(batch, device)
        return model(r.x.to(device)).float().sum() * 0.0

    def eval_sums(self, model, batch: PromptBatch, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """(``metrics`` summed over the micro-batch's prompts, from greedy replies; the prompts)."""
        done = greedy_batch(self.raw, self.tokenizer, [p.ids for p in batch.prompts], self.g.max_new_tokens,
                            stop_token_ids=[self.turn_end])  # fmt: skip
        pairs = list(zip(batch.prompts, done, strict=True))
        rewards = torch.tensor([self.rewards(p, c.text) for p, c in pairs])
        values = {
            "loss": -rewards,
            "reward": rewards,
            "reward_sq": rewards**2,
            "accuracy": torch.tensor([exact(p.messages, c.text, p.record) for p, c in pairs]),
            "length": torch.tensor([float(len(c.ids)) for c in done]),
        }
        if self.has_reference:
            replies = [c.ids + [self.turn_end] * (c.finish_reason == "stop") for c in done]
            x, y = pack([p.ids for p in batch.prompts], [r or [self.turn_end] for r in replies],
                        self.tokenizer.eot_id)  # fmt: skip
            logp = self.target_logps(self.raw, x, y, device)
            ref_model = self.raw if self.lora else self.reference_model(device)
            with self.ref_context(ref_model):
                ref = self.target_logps(ref_model, x, y, device)
            mask = y != -1
            values["kl"] = (k3(logp, ref) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.stack([values[k].to(dtype).sum() for k in self.metrics]).to(device), len(done)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the rollouts in use and where the reference comes from."""
        rollouts = [{"key": list(k), **vars(r)} for k, r in self.rollouts.items()]
        return {"init_from": self.init_from, "rollouts": rollouts}

    def load_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.init_from = state.get("init_from", self.init_from)
        self.rollouts = {}
        for r in state.get("rollouts", []):
            fields = {k: v for k, v in r.items() if k != "key"}
            self.rollouts[tuple(r["key"])] = Rollout(**fields)
