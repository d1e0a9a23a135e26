"""Typed configuration: the training run's dataclasses, their validation, and ``from_dict``, which
builds any of our config dataclasses (these and ``gpt.infer.config``'s) from a plain dict.

The entry points (``train.py``, ``sample.py``, ``gpt serve``) let Hydra compose ``conf/``
and then call ``TrainRunConfig.from_dict`` / ``SampleConfig.from_dict`` / ``ServeConfig.from_dict``
on the resolved dictionary; nothing in ``gpt/`` sees a Hydra object. Unknown keys, wrong types and
impossible values raise ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gpt.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """A user path as given; a relative path that does not exist from the working directory is
    also looked up from the repository root, so the shipped ``data/...`` works from anywhere."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or any(ch in str(p) for ch in "*?["):
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


@dataclass
class ModelConfig:
    """Model shape; None means "take it from init_from's checkpoint" (or the GPTConfig default)."""

    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    mlp_ratio: float | None = None
    dropout: float | None = None
    bias: bool | None = None
    norm: str | None = None
    pos_emb: str | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    activation: str | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataConfig:
    name: str = "shakespeare_char"
    """Preset name, for display and for the prepared-data cache folder."""
    format: Literal["text", "dialogs", "pairs"] = "text"
    """'text': raw documents (.txt files or JSONL with a text field); 'dialogs': chat transcripts;
    'pairs': preference pairs (chosen and rejected replies), trained with the DPO objective."""
    path: str = "data/tinyshakespeare/input.txt"
    """A file, a directory (its .txt/.jsonl files, also .gz/.zst, and .parquet files, recursively) or
    a glob."""
    tokenizer: Literal["char", "bpe", "gpt2", "hf"] = "char"
    """'char' (built from the corpus), 'bpe' (trained on the corpus), 'gpt2' (shipped ranks),
    'hf' (vocab.json + merges.txt in tokenizer_path)."""
    tokenizer_path: str | None = None
    vocab_size: int = 4096
    """Target vocabulary size of a trained BPE tokenizer (special tokens included)."""
    bpe_train_bytes: int = 100_000_000
    """Train the BPE tokenizer on at most this many bytes of the corpus."""
    text_field: str = "text"
    """The JSONL key / Parquet column that holds each document's text."""
    jsonl_field: str | None = None
    """The older name of text_field; when set, it is used as text_field."""
    val_fraction: float = 0.1
    """The last fraction of the corpus (by bytes, cut at a line boundary; by tokens when max_tokens or
    val_tokens is set) is held out for eval."""
    max_tokens: int = 0
    """Stop after this many tokens (train + val) of the corpus, in input order; 0 = all of it."""
    val_tokens: int = 0
    """A val split of exactly this many tokens, the last ones kept; 0 = val_fraction decides."""
    cache_dir: str = "data/cache"
    """Prepared shards are cached here, keyed by the inputs and the tokenizer."""
    num_workers: int = 0
    """Tokenization processes per rank; 0 = the CPU cores, shared by the ranks of a node."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file."""
    separator: str | None = None
    """Dialogs only: a line that separates plain-text dialogs (default: a blank line)."""
    skip_invalid: bool = False
    """Dialogs only: skip malformed dialogs (and report how many) instead of stopping."""
    packing: bool = False
    """Dialogs only: pack several dialogs into each row of block_size, each attending only to itself."""

    def __post_init__(self) -> None:
        if self.jsonl_field is not None:
            self.text_field = self.jsonl_field
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1) (e.g. 0.1)")
        for key in ("max_tokens", "val_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 0 (0 = no limit / unused)")
        if self.max_tokens and self.val_tokens >= self.max_tokens:
            raise ConfigError(
                f"data.val_tokens={self.val_tokens} leaves no training tokens of data.max_tokens="
                f"{self.max_tokens}; raise max_tokens or lower val_tokens"
            )

    @property
    def split_by_tokens(self) -> bool:
        """Whether val is cut from the end of the kept tokens (else at a byte offset of the input)."""
        return bool(self.max_tokens or self.val_tokens)


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """'adamw'; 'muon': torch.optim.Muon for the blocks' 2-D weights (at muon_lr), AdamW for the
    embeddings, the head, norms and biases (at lr); both follow the one schedule."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup (with name=muon: the AdamW part's)."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """Applied to the 2-D weights (matrices and embedding tables), not to biases or norms (see
    gpt.train.optim)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    muon_lr: float = 0.05
    """name=muon: peak learning rate of the Muon part (the blocks' matrices)."""
    muon_momentum: float = 0.95
    """name=muon: Muon's (Nesterov) momentum."""
    muon_weight_decay: float = 0.0
    """name=muon: decoupled weight decay of the Muon part (each step: w -= muon_lr * this * w)."""

    def __post_init__(self) -> None:
        check_ranges("optim.", self, [
            ("lr", finite(self.lr) and self.lr > 0, "must be a finite number > 0, e.g. 3e-4"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1] (the final lr / peak lr)"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1), e.g. 0.9"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1), e.g. 0.95"),
            ("eps", finite(self.eps) and self.eps > 0, "must be a finite number > 0, e.g. 1e-8"),
            ("grad_clip", finite(self.grad_clip) and self.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
        ])  # fmt: skip


@dataclass
class TrainConfig:
    max_steps: int = 5000
    batch_size: int = 64
    """Global batch: sequences per optimizer step, summed over all processes."""
    micro_batch_size: int | None = None
    """Sequences per device per forward; None = the whole per-process batch (no accumulation)."""
    eval_interval: int = 250
    eval_steps: int = 20
    """Global batches (of batch_size windows) averaged for each of train_loss and val_loss."""
    eval_tasks: list[str] = field(default_factory=list)
    """Tasks scored at each eval (gpt.eval.tasks): task files or directories, or 'cloze'."""
    log_interval: int = 10
    ckpt_interval: int = 1000
    compile: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 autocast on GPUs that have it (else fp16 + GradScaler), on CPUs with native bf16
    (AVX512-BF16/AMX) too, fp32 elsewhere (gpt.device.resolve_dtype)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' replicates the model on every rank, 'fsdp' shards it (FSDP2)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, one more forward."""
    keep_best: bool = False
    """Also keep best.pt, the checkpoint with the lowest val_loss so far."""
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU; None = measure a matmul at start-up."""
    progress: bool = True
    """Show a progress bar (when the console is a terminal)."""
    timeout_s: int = 1800
    """Multi-process runs: seconds a collective waits for the other ranks before the job fails."""
    keep_last: int = 2
    """Checkpoints kept: ckpt.pt and the previous ones as ckpt-STEP.pt (a damaged newest one is
    passed over on resume)."""
    max_bad_steps: int = 5
    """A step with a non-finite loss or gradient norm is skipped; this many in a row roll back."""
    spike_std: float = 0.0
    """Roll back on a loss above the mean + spike_std standard deviations of the last spike_window
    good steps; 0 = off."""
    spike_window: int = 50
    max_rollbacks: int = 3
    """Rollbacks in a row (without a checkpoint past the failing step) before the run stops."""
    rollback_lr_factor: float = 1.0
    """Each rollback multiplies the learning rate by this (1 = unchanged)."""

    def __post_init__(self) -> None:
        mbs = self.micro_batch_size
        check_ranges("train.", self, [
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("micro_batch_size", mbs is None or mbs >= 1, "must be >= 1 or null (the whole batch)"),
            ("eval_interval", self.eval_interval >= 0, "must be >= 0 (0 = never)"),
            ("eval_steps", self.eval_steps >= 1, "must be >= 1 (to skip evals: eval_interval=0)"),
            ("log_interval", self.log_interval >= 1, "must be >= 1"),
            ("ckpt_interval", self.ckpt_interval >= 0, "must be >= 0 (0 = only at the end)"),
            ("peak_flops", self.peak_flops is None or (finite(self.peak_flops) and self.peak_flops > 0),
             "must be > 0 or null (measure)"),
            ("timeout_s", self.timeout_s >= 1, "must be >= 1"),
            ("keep_last", self.keep_last >= 1, "must be >= 1"),
            ("max_bad_steps", self.max_bad_steps >= 1, "must be >= 1"),
            ("spike_std", finite(self.spike_std) and self.spike_std >= 0, "must be >= 0 (0 = off)"),
            ("spike_window", self.spike_window >= 2, "must be >= 2"),
            ("max_rollbacks", self.max_rollbacks >= 0, "must be >= 0"),
            ("rollback_lr_factor", 0 < self.rollback_lr_factor <= 1, "must be in (0, 1]"),
        ])  # fmt: skip


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
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "gpt"
    name: str | None = None
    entity: str | None = None


@dataclass
class TrainRunConfig:
    out_dir: str = "out/shakespeare_char"
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    resume: bool = False
    """Continue the run in out_dir from its latest checkpoint."""
    init_from: str | None = None
    """Start from another run's weights: a run directory, or hf:DIR for Hugging Face GPT-2."""
    overwrite: bool = False
    """Allow starting a fresh run in an out_dir that already holds a checkpoint."""
    resume_force: bool = False
    """Resume even though settings that define the run (data, seed, batch, optimizer) changed."""
    experiment: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        # the run seeds seed + rank and seed + 2 streams: keep them inside a signed 64-bit integer
        check_ranges("", self, [("seed", 0 <= self.seed < 2**63 - 1024, "must be in [0, 2**63 - 1024)")])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRunConfig:
        return from_dict(cls, d)

    @classmethod
    def from_command_line(cls, d: dict[str, Any], given: frozenset[str] | set[str]) -> TrainRunConfig:
        """From a composed command line: a run that loads a checkpoint (``init_from``, ``resume``)
        takes its shape from it, so the model preset's keys count only where the user typed them
        (``model.block_size=256``) or chose a preset (``model=gpt2``)."""
        d = dict(d)
        if (d.get("init_from") or d.get("resume")) and "model" not in given:
            d["model"] = {k: v for k, v in (d.get("model") or {}).items() if f"model.{k}" in given}
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def finite(x: float) -> bool:
    """Not NaN, not infinite."""
    return x == x and abs(x) != float("inf")


def check_ranges(prefix: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ConfigError naming the first key of ``checks`` (name, ok, valid range) that fails."""
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)!r} is out of range: {why}")


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Check (and lightly coerce: int -> float) one value against its annotation."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r} must be one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_check_value(f"{key}[{i}]", get_args(tp)[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a group of keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


def from_dict(cls: type[T], d: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    if d is None:
        d = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(names)}"
        )
    kwargs = {k: _check_value(f"{prefix}{k}", hints[k], v) for k, v in d.items()}
    return cls(**kwargs)
