"""The training stages' configs: how init_from's weights are fine-tuned (full or LoRA), the
preference objective (DPO, IPO) and reinforcement learning from rewards (GRPO).

They are groups of ``gpt.config.TrainRunConfig`` (``finetune``, ``dpo``, ``grpo``), read and checked
as its other groups are: the string under each field is its doc (``python train.py --help``), and
``__post_init__`` refuses an impossible value with one ``ConfigError`` line naming the key.

    from gpt.stage_config import DPOConfig
    DPOConfig(beta=0.1, loss="ipo")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpt.errors import ConfigError
from gpt.typed_config import check_ranges


@dataclass
class FinetuneConfig:
    """How init_from's weights are trained (see gpt.lora for LoRA)."""

    method: Literal["full", "lora"] = "full"
    """'full': every weight trains; 'lora': the base is frozen, low-rank adapters train."""
    lora_rank: int = 8
    """Rank r of each adapter (A is r x in, B is out x r)."""
    lora_alpha: float = 16.0
    """The adapter's output is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    """Linear layers that get adapters: c_attn, c_proj (both attn.c_proj and mlp.c_proj), c_fc,
    or attn.c_proj / mlp.c_proj alone."""

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ConfigError(f"finetune.lora_rank={self.lora_rank} must be >= 1 (8 or 16 are usual)")
        if not self.lora_alpha > 0:
            raise ConfigError(f"finetune.lora_alpha={self.lora_alpha} must be > 0 (usually 2 x lora_rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.lora_targets:
            raise ConfigError("finetune.lora_targets is empty; e.g. [c_attn, c_proj, c_fc]")


@dataclass
class DPOConfig:
    """The preference objective (data.format=pairs; see gpt.train.objective)."""

    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid': DPO, -log sigmoid(beta * h); 'ipo': (h - 1 / (2 beta))^2, where h is the chosen
    reply's log-ratio to the reference minus the rejected one's."""
    beta: float = 0.1
    """How far the policy may move from the reference: higher = closer."""
    sft_weight: float = 0.0
    """Weight of an added NLL term (mean per token) on the chosen reply; 0 = off."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0 (0.1 is usual)")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight={self.sft_weight} must be >= 0 (0 = off)")


@dataclass
class GRPOConfig:
    """Reinforcement learning from rewards (data.format=prompts; see gpt.train.grpo)."""

    group_size: int = 8
    """G: replies sampled per prompt; each reply's advantage is its reward against its group's."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (evals decode greedily)."""
    max_new_tokens: int = 32
    """Longest reply sampled; a reply cut here gets no end-of-turn token."""
    rewards: list[str] = field(default_factory=lambda: ["exact"])
    """Reward functions, summed: 'exact' (1 if the reply's final answer, its last word, equals the
    prompt's answer), 'regex:PATTERN' (1 if the reply matches, re.search), 'module:function' (a
    Python function (messages, reply, record) -> float; module importable from the working directory)."""
    reward_weights: list[float] = field(default_factory=list)
    """A weight per reward function; empty = 1 each."""
    clip_eps: float = 0.2
    """The ratio pi / pi_old is clipped to [1 - clip_eps, 1 + clip_eps] (PPO's clip)."""
    kl_coef: float = 0.0
    """Weight of the k3 estimate of KL(pi || initial model) per token; 0 = off (no reference pass)."""
    epochs: int = 1
    """Optimizer steps per batch of rollouts: step s trains on rollout batch s // epochs."""

    def __post_init__(self) -> None:
        check_ranges("grpo.", self, [
            ("group_size", self.group_size >= 2, "must be >= 2 (advantages compare replies to one prompt)"),
            ("temperature", self.temperature > 0, "must be > 0 (1.0 samples the model as it is)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("clip_eps", 0 < self.clip_eps < 1, "must be in (0, 1) (0.2 is usual)"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0 (0 = off)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
        ])  # fmt: skip
        if not self.rewards:
            raise ConfigError("grpo.rewards is empty; e.g. [exact] or [exact, 'regex:^\\d+$']")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"grpo.reward_weights has {len(self.reward_weights)} weights for "
                              f"{len(self.rewards)} rewards; give one per reward, or none")  # fmt: skip
