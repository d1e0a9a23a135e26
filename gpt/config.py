"""Typed configuration: the dataclasses every part of ``gpt/`` receives, and their validation.

The entry points (``train.py``, ``sample.py``) let Hydra compose ``conf/`` and then call
``TrainRunConfig.from_dict`` / ``SampleConfig.from_dict`` on the resolved dictionary; nothing in
``gpt/`` sees a Hydra object. Unknown keys, wrong types and impossible values raise ``ConfigError``
naming the key and the fix.
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
        _check_ranges("optim.", self, [
            ("lr", _finite(self.lr) and self.lr > 0, "must be a finite number > 0, e.g. 3e-4"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1] (the final lr / peak lr)"),
            ("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1), e.g. 0.9"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1), e.g. 0.95"),
            ("eps", _finite(self.eps) and self.eps > 0, "must be a finite number > 0, e.g. 1e-8"),
            ("grad_clip", _finite(self.grad_clip) and self.grad_clip >= 0, "must be >= 0 (0 = off)"),
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
        _check_ranges("train.", self, [
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("micro_batch_size", mbs is None or mbs >= 1, "must be >= 1 or null (the whole batch)"),
            ("eval_interval", self.eval_interval >= 0, "must be >= 0 (0 = never)"),
            ("eval_steps", self.eval_steps >= 1, "must be >= 1 (to skip evals: eval_interval=0)"),
            ("log_interval", self.log_interval >= 1, "must be >= 1"),
            ("ckpt_interval", self.ckpt_interval >= 0, "must be >= 0 (0 = only at the end)"),
            ("peak_flops", self.peak_flops is None or (_finite(self.peak_flops) and self.peak_flops > 0),
             "must be > 0 or null (measure)"),
            ("timeout_s", self.timeout_s >= 1, "must be >= 1"),
            ("keep_last", self.keep_last >= 1, "must be >= 1"),
            ("max_bad_steps", self.max_bad_steps >= 1, "must be >= 1"),
            ("spike_std", _finite(self.spike_std) and self.spike_std >= 0, "must be >= 0 (0 = off)"),
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
        _check_ranges("", self, [("seed", 0 <= self.seed < 2**63 - 1024, "must be in [0, 2**63 - 1024)")])

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


def _finite(x: float) -> bool:
    """Not NaN, not infinite."""
    return x == x and abs(x) != float("inf")


def _check_ranges(prefix: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Sampling: the controls of gpt.infer.generate (usable from Python) and sample.py's run config.


@dataclass
class GenerationConfig:
    """How to continue a prompt (``gpt.infer.generate``). Logits pass, in this order: repetition,
    frequency and presence penalties -> temperature -> top_k -> top_p -> min_p -> sample."""

    max_new_tokens: int = 500
    """Tokens to generate per sample (fewer when a stop string or stop token ends it)."""
    temperature: float = 0.8
    """Divide the logits by this; 0 = greedy (always the most likely token)."""
    top_k: int = 200
    """Sample among the k most likely tokens only; 0 = no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability mass reaches top_p; 1 = off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 = off."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already in the context; 1 = off."""
    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the context from its logit; 0 = off."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token present in the context; 0 = off."""
    stop: list[str] | str = field(default_factory=list)
    """Strings that end a sample when generated (they may span several tokens); not emitted."""
    num_samples: int = 1
    """Samples drawn together as one batch (with beam search: the best hypotheses returned)."""
    seed: int | None = None
    """Seed of the sampling generator: same seed, same output; None = a fresh random seed."""
    num_beams: int = 1
    """Beam search width for the most likely continuation instead of a sample; 1 = sampling."""
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by sum(log p) / length**length_penalty."""
    context_shift: int | None = None
    """When the context is full, drop this many oldest tokens and re-fill the KV cache (1 = an exact
    sliding window, re-filled every token); None = a quarter of block_size."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range setting."""
        finite = lambda x: x == x and abs(x) != float("inf")  # not NaN, not infinite
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", finite(self.temperature) and self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = no limit)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 = off)"),
            # bounds that keep the logits finite in float32 (1e-300 would round to 0, 1e308 to inf)
            ("repetition_penalty", 1e-6 <= self.repetition_penalty <= 1e6,
             "must be in [1e-6, 1e6] (1 = off, > 1 discourages repeats)"),
            ("frequency_penalty", abs(self.frequency_penalty) <= 1e4, "must be in [-1e4, 1e4] (0 = off)"),
            ("presence_penalty", abs(self.presence_penalty) <= 1e4, "must be in [-1e4, 1e4] (0 = off)"),
            ("num_samples", self.num_samples >= 1, "must be >= 1"),
            ("num_beams", self.num_beams >= 1, "must be >= 1 (1 = sampling, no beam search)"),
            ("length_penalty", abs(self.length_penalty) <= 100, "must be in [-100, 100] (1 = mean log p)"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "must be in [0, 2**64) or null"),
            ("context_shift", self.context_shift is None or self.context_shift >= 1, "must be >= 1 or null"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range: {why}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise ConfigError(
                f"num_samples={self.num_samples} exceeds num_beams={self.num_beams}: beam search returns "
                "at most num_beams hypotheses; raise num_beams or lower num_samples"
            )


@dataclass
class SampleConfig(GenerationConfig):
    """sample.py's configuration (conf/sample.yaml): the generation controls plus where the model
    comes from and how to run it."""

    seed: int | None = 1337
    """Same seed, same samples (the library default is None: a fresh seed each call)."""
    ckpt: str = "out/shakespeare_char"
    """Run directory (its ckpt.pt) or checkpoint file to sample from."""
    prompt: str = ""
    """Text to continue, verbatim; empty = start from <|endoftext|>."""
    prompt_file: str | None = None
    """Read the prompt from this UTF-8 file instead."""
    mode: Literal["generate", "interactive", "chat"] = "generate"
    """generate: print the samples and exit; interactive: a prompt loop with live settings; chat: a
    conversation with an instruction-tuned model (with a prompt: print just the reply and exit)."""
    system: str | None = None
    """mode=chat: the system prompt (kept when old turns are dropped to fit the context)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights' dtype for inference; auto = bf16 (else fp16) on CUDA, bf16 on CPUs with native bf16
    (AVX512-BF16/AMX), fp32 elsewhere."""
    echo_prompt: bool = True
    """mode=generate: print the prompt before each sample's continuation."""
    history_file: str | None = "~/.gpt_history"
    """mode=interactive: readline history file; null = no history kept across sessions."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleConfig:
        return from_dict(cls, d)

    def generation(self) -> GenerationConfig:
        """The generation controls alone (stop strings verbatim, as every free-text value)."""
        names = [f.name for f in dataclasses.fields(GenerationConfig)]
        return GenerationConfig(**{name: getattr(self, name) for name in names})


@dataclass
class ServeConfig:
    """``python -m gpt.serve``'s configuration (conf/serve.yaml): the model, the address and the limits
    of the OpenAI-compatible server (``gpt.serve``)."""

    ckpt: str = "out/shakespeare_char"
    """Run directory, checkpoint file, LoRA run (adapters applied) or hf:DIR to serve."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback is reachable from other machines (a warning says so)."""
    port: int = 8000
    model_name: str | None = None
    """The name clients give as ``model``; None = the checkpoint directory's name."""
    api_key: str | None = None
    """When set, /v1/* requires ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = 16
    """Rows decoded together (a request with n choices takes n rows)."""
    max_queue: int = 64
    """Requests that may wait for rows; beyond that a request gets 429."""
    max_tokens: int | None = None
    """The most tokens a request may ask for; None = the context length. Also the default."""
    max_n: int = 8
    """The most choices (``n``) one request may ask for (at most max_batch)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 beyond)."""
    shutdown_timeout: float = 30.0
    """On SIGTERM: seconds granted to in-flight requests before the server exits."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535] (0 = any free port)"),
            ("max_batch", self.max_batch >= 1, "must be >= 1"),
            ("max_queue", self.max_queue >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1 or null"),
            ("max_n", self.max_n >= 1, "must be >= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("shutdown_timeout", self.shutdown_timeout >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} {why}")
        self.max_n = min(self.max_n, self.max_batch)  # n choices take n rows of the batch

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        return from_dict(cls, d)


def unescape(text: str) -> str:
    r"""Turn the two-character sequences \n, \t and \\ into a newline, a tab and a backslash."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
