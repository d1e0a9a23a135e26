"""The training run's typed configuration: ``TrainRunConfig`` and its groups (model, data, optim,
train, wandb; the stages' finetune, dpo and grpo are in ``gpt.stage_config``), each with its checks
in ``__post_init__``.

These dataclasses are the one source of every key, its default (the default run: ``TrainRunConfig()``
is what ``python train.py`` runs) and its doc (the string under each field; ``python train.py
--help`` prints them). The commands register them as the schema of Hydra's composition
(``gpt.commands.cli``); conf/ holds only the presets' differences. ``train.py`` calls
``TrainRunConfig.from_command_line`` on the resolved dictionary (built by ``gpt.typed_config.from_dict``);
nothing in ``gpt/`` sees a Hydra object. Unknown keys, wrong types and impossible values raise
``ConfigError`` naming the key and the fix: the one place they are checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from gpt.errors import ConfigError
from gpt.stage_config import DPOConfig, FinetuneConfig, GRPOConfig
from gpt.typed_config import Dtype, check_ranges, finite, from_dict

# field(metadata=RESUMABLE): a setting a resume may change (how often things happen, how long, how it is
# shown, where it runs; a whole group: the model's shape, checked against the checkpoint's instead).
# Every other setting defines the run: a resume must keep it (gpt.train.setup.run_fingerprint).
RESUMABLE = {"resumable": True}


@dataclass
class ModelConfig:
    """Model shape; None means "take it from init_from's checkpoint" (or the GPTConfig default).
    The default run's shape is TrainRunConfig.model's default."""

    block_size: int | None = None
    """Context length (tokens); with init_from it may shrink, never grow."""
    n_layer: int | None = None
    """Transformer blocks."""
    n_head: int | None = None
    """Attention (query) heads (n_embd must divide by it)."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention (1 = multi-query; n_head must divide by it);
    unset = n_head. The KV cache holds n_kv_head heads."""
    n_embd: int | None = None
    """Residual stream width."""
    mlp: str | None = None
    """standard (c_fc -> activation -> c_proj) | swiglu (Llama's gated MLP, SiLU; activation unused)."""
    mlp_ratio: float | None = None
    """Standard MLP hidden width = mlp_ratio * n_embd (when mlp_hidden is unset)."""
    mlp_hidden: int | None = None
    """MLP hidden width (HF's intermediate_size); unset = mlp_ratio * n_embd for standard, Llama's
    2/3 * 4 * n_embd rounded up to a multiple of 256 for swiglu."""
    dropout: float | None = None
    """Dropout probability (0 = off); with init_from, set it to regularise."""
    bias: bool | None = None
    """Biases in linear layers and norms."""
    qkv_bias: bool | None = None
    """A bias on the q, k, v projection even with bias=false (Qwen2)."""
    norm: str | None = None
    """layernorm | rmsnorm."""
    norm_eps: float | None = None
    """The norms' epsilon; unset = 1e-5 for layernorm, 1e-6 for rmsnorm."""
    pos_emb: str | None = None
    """learned (GPT-2's table) | rope (rotary)."""
    rope_theta: float | None = None
    """RoPE base frequency (unused with learned positions)."""
    rope_scaling_factor: float | None = None
    """Llama 3's rope scaling factor (1 = no scaling)."""
    rope_low_freq_factor: float | None = None
    """Llama 3's rope scaling: low_freq_factor (default 1)."""
    rope_high_freq_factor: float | None = None
    """Llama 3's rope scaling: high_freq_factor (default 4)."""
    rope_original_max_position: int | None = None
    """Llama 3's rope scaling: original_max_position_embeddings (default 8192)."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the output head."""
    activation: str | None = None
    """MLP nonlinearity: gelu_tanh (GPT-2's) | gelu (exact) | relu2 (ReLU squared)."""

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataConfig:
    name: str = field(default="shakespeare_char", metadata=RESUMABLE)
    """Preset name: names the prepared-data cache folder and the default out_dir."""
    format: Literal["text", "dialogs", "pairs", "prompts"] = "text"
    """'text': raw documents (.txt files or JSONL with a text field); 'dialogs': chat transcripts;
    'pairs': preference pairs (chosen and rejected replies), trained with the DPO objective;
    'prompts': prompts with an answer, trained with GRPO on rewards (gpt.train.grpo)."""
    path: str = "data/tinyshakespeare/input.txt"
    """A file, a directory (its .txt/.jsonl files, also .gz/.zst, and .parquet files, recursively) or
    a glob."""
    tokenizer: Literal["char", "bpe", "gpt2", "hf"] = "char"
    """'char' (built from the corpus), 'bpe' (trained on the corpus), 'gpt2' (shipped ranks),
    'hf' (a Hugging Face model's tokenizer, from tokenizer_path)."""
    tokenizer_path: str | None = None
    """tokenizer=hf: a Hugging Face model directory with tokenizer.json (+ tokenizer_config.json, whose
    eos_token ends each document: Llama, Mistral, Qwen2, SmolLM2) or vocab.json + merges.txt (GPT-2)."""
    vocab_size: int = 4096
    """Target vocabulary size of a trained BPE tokenizer (special tokens included)."""
    bpe_train_bytes: int = 100_000_000
    """Train the BPE tokenizer on at most this many bytes of the corpus."""
    text_field: str = "text"
    """The JSONL key / Parquet column that holds each document's text."""
    jsonl_field: str | None = None
    """The older name of text_field; when set, it is used as text_field."""
    val_fraction: float = 0.1
    """The last fraction of the corpus's tokens (of the first max_tokens, when set) is held out for
    eval: the same split for every file format, and gpt eval bpb data.split=val's."""
    max_tokens: int = 0
    """Stop after this many tokens (train + val) of the corpus, in input order; 0 = all of it."""
    val_tokens: int = 0
    """A val split of exactly this many tokens, the last ones kept; 0 = val_fraction decides."""
    cache_dir: str = field(default="data/cache", metadata=RESUMABLE)
    """Prepared shards are cached here, keyed by the inputs and the tokenizer."""
    num_workers: int = field(default=0, metadata=RESUMABLE)
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


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """'adamw'; 'muon': torch.optim.Muon for the blocks' 2-D weights (at muon_lr), AdamW for the
    embeddings, the head, norms and biases (at lr); both follow the one schedule."""
    lr: float = 2e-3
    """Peak learning rate, reached after warmup (with name=muon: the AdamW part's)."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio."""
    weight_decay: float = 0.5
    """Applied to the 2-D weights (matrices and embedding tables), not to biases or norms (see
    gpt.train.optim). 0.5: the default char model overfits (0.1 is usual for large ones)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    warmup_steps: int = 100
    """Linear warmup from lr / warmup_steps to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """The decay after warmup, to lr * min_lr_ratio."""
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
            ("muon_lr", finite(self.muon_lr) and self.muon_lr > 0, "must be a finite number > 0, e.g. 0.02"),
            ("muon_momentum", 0 <= self.muon_momentum < 1, "must be in [0, 1), e.g. 0.95"),
            ("muon_weight_decay", finite(self.muon_weight_decay) and self.muon_weight_decay >= 0,
             "must be >= 0"),
        ])  # fmt: skip


@dataclass
class TrainConfig:
    max_steps: int = field(default=4000, metadata=RESUMABLE)
    """Optimizer steps."""
    batch_size: int = 16
    """Global batch: sequences per optimizer step, summed over all processes."""
    micro_batch_size: int | None = field(default=None, metadata=RESUMABLE)
    """Sequences per device per forward; None = the whole per-process batch (no accumulation)."""
    eval_interval: int = field(default=500, metadata=RESUMABLE)
    """Steps between evals (train/val loss -> metrics.jsonl); 0 = never."""
    eval_steps: int = field(default=20, metadata=RESUMABLE)
    """Global batches (of batch_size windows) averaged for each of train_loss and val_loss."""
    eval_tasks: list[str] = field(default_factory=list)
    """Tasks scored at each eval (gpt.eval.tasks): task files or directories, or 'cloze'."""
    log_interval: int = field(default=10, metadata=RESUMABLE)
    """Steps between console lines."""
    ckpt_interval: int = field(default=500, metadata=RESUMABLE)
    """Steps between checkpoints (also at the end and on Ctrl-C/SIGTERM); 0 = only then."""
    compile: bool = field(default=False, metadata=RESUMABLE)
    """torch.compile the model (falls back to eager with a notice)."""
    dtype: Dtype = "auto"
    """'auto': bf16 autocast on GPUs that have it (else fp16 + GradScaler), on CPUs with native bf16
    (AVX512-BF16/AMX) too, fp32 elsewhere (gpt.device.resolve_dtype)."""
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata=RESUMABLE)
    """Under torchrun: 'ddp' replicates the model on every rank, 'fsdp' shards it (FSDP2)."""
    activation_checkpointing: bool = field(default=False, metadata=RESUMABLE)
    """Recompute each block's activations in the backward pass: less memory, one more forward."""
    keep_best: bool = field(default=False, metadata=RESUMABLE)
    """Also keep best.pt, the checkpoint with the lowest val_loss so far."""
    peak_flops: float | None = field(default=None, metadata=RESUMABLE)
    """Device peak FLOP/s for MFU; None = measure a matmul at start-up."""
    progress: bool = field(default=True, metadata=RESUMABLE)
    """Show a progress bar (when the console is a terminal)."""
    timeout_s: int = field(default=1800, metadata=RESUMABLE)
    """Multi-process runs: seconds a collective waits for the other ranks before the job fails."""
    keep_last: int = field(default=2, metadata=RESUMABLE)
    """Checkpoints kept: ckpt.pt and the previous ones as ckpt-STEP.pt, or a sharded run's
    ckpt-STEP.dcp directories (a damaged newest one is passed over on resume)."""
    checkpoint_format: Literal["auto", "single", "sharded"] = field(default="auto", metadata=RESUMABLE)
    """'single': one file (ckpt.pt), the weights gathered to rank 0; 'sharded': a ckpt-STEP.dcp
    directory where each rank writes its own shards with torch.distributed.checkpoint (gpt.dcp),
    resumed by any world size and read by sample.py and export as they read ckpt.pt; 'auto': sharded
    under train.parallel=fsdp with more than one rank, else single."""
    async_checkpoint: bool = field(default=False, metadata=RESUMABLE)
    """Sharded checkpoints only: each rank copies its shards to CPU memory at the save (one more copy
    of them) and a background thread writes them while training goes on; the manifest and rename
    follow once every rank's files are written (before the next save, a rollback, and at the end)."""
    max_bad_steps: int = field(default=5, metadata=RESUMABLE)
    """A step with a non-finite loss or gradient norm is skipped; this many in a row roll back."""
    spike_std: float = field(default=0.0, metadata=RESUMABLE)
    """Roll back on a loss above the mean + spike_std standard deviations of the last spike_window
    good steps; 0 = off."""
    spike_window: int = field(default=50, metadata=RESUMABLE)
    """Recent good steps the loss spike test averages over."""
    max_rollbacks: int = field(default=3, metadata=RESUMABLE)
    """Rollbacks in a row (without a checkpoint past the failing step) before the run stops."""
    rollback_lr_factor: float = field(default=1.0, metadata=RESUMABLE)
    """Each rollback multiplies the learning rate by this (1 = unchanged)."""
    dry_run: int = field(default=0, metadata=RESUMABLE)
    """Plan a job of this many ranks without running it: build the model as rank 0 of dry_run on
    PyTorch's fake process group with fake tensors (no memory for the weights), run one step through
    the sharding, activation checkpointing, optimizer and guard, and print per-rank memory, step FLOPs
    and the planner's choice (gpt.train.dry_run); nothing is written. 0 = train."""
    device_memory: str | None = field(default=None, metadata=RESUMABLE)
    """Memory of one device, e.g. 80GiB, 24GB or 'auto' (the device's free memory): the planner
    (gpt.train.memory.plan) picks the largest micro_batch_size that fits it with a 10% margin, and
    turns activation_checkpointing on when nothing fits without it; an explicit micro_batch_size is
    kept and only checked. None = no planning (a dry run plans for 80GiB, an H100's)."""

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
            ("dry_run", self.dry_run >= 0, "must be >= 0 (the world size to plan for; 0 = off)"),
        ])  # fmt: skip
        self.device_memory_bytes()  # a malformed size is refused here, with the run's other settings

    def device_memory_bytes(self) -> int | None:
        """train.device_memory in bytes (80GiB, 24GB, 1.5e10); None for unset or 'auto'."""
        text = (self.device_memory or "auto").strip()
        if text == "auto":
            return None
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
        number = text.rstrip("BbIiKkMmGgTt ")
        unit = text[len(number):].strip().upper()
        try:
            value = float(number) * units[unit]
        except (KeyError, ValueError):
            value = -1.0
        if not (finite(value) and value >= 2**20):
            raise ConfigError(
                f"train.device_memory={self.device_memory!r} is not a memory size; write e.g. 80GiB, "
                "24GB or auto (the device's free memory)"
            )
        return int(value)


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline (no account needed) | online (after `wandb login`) | disabled."""
    project: str = "gpt"
    """wandb project name."""
    name: str | None = None
    """Run name; None = out_dir's name."""
    entity: str | None = None
    """wandb team or user; None = your default."""


@dataclass
class TrainRunConfig:
    """A training run. The defaults are the default run: char-level Tiny Shakespeare in under 5 minutes
    on a 2-core CPU (docs/benchmarks.md has the experiments behind it)."""

    out_dir: str | None = field(default=None, metadata=RESUMABLE)
    """Run directory (config.yaml, tokenizer.json, ckpt.pt, metrics.jsonl); None = out/<data.name>."""
    seed: int = 1337
    """Initial weights, dropout and the batch sequence."""
    device: Literal["auto", "cpu", "cuda", "mps"] = field(default="auto", metadata=RESUMABLE)
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    resume: bool = field(default=False, metadata=RESUMABLE)
    """Continue the run in out_dir from its latest checkpoint."""
    init_from: str | None = field(default=None, metadata=RESUMABLE)
    """Start from another run's weights: a run directory, or hf:DIR for Hugging Face GPT-2."""
    overwrite: bool = field(default=False, metadata=RESUMABLE)
    """Allow starting a fresh run in an out_dir that already holds a checkpoint."""
    resume_force: bool = field(default=False, metadata=RESUMABLE)
    """Resume even though settings that define the run (data, seed, batch, optimizer) changed."""
    experiment: str = "pretrain"
    """The stage (conf/experiment/ preset), recorded in config.yaml."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        block_size=128, n_layer=4, n_head=4, n_embd=128, mlp_ratio=4.0, dropout=0.0, bias=False,
        norm="layernorm", pos_emb="rope", rope_theta=10000.0, tie_embeddings=True, activation="relu2",
    ), metadata=RESUMABLE)  # fmt: skip
    """The shape; the default is char-level Tiny Shakespeare's (layernorm: the same val_loss as rmsnorm
    here, and one fused kernel each way on CPUs; relu2: the lowest val_loss here)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        if self.out_dir is None:
            self.out_dir = f"out/{self.data.name}"
        # the run seeds seed + rank and seed + 2 streams: keep them inside a signed 64-bit integer
        check_ranges("", self, [("seed", 0 <= self.seed < 2**63 - 1024, "must be in [0, 2**63 - 1024)")])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRunConfig:
        """From a plain dict; a run that loads a checkpoint (``init_from``, ``resume``) and names no
        ``model`` keys takes its whole shape from the checkpoint, as ``python train.py`` does."""
        if (d.get("init_from") or d.get("resume")) and "model" not in d:
            d = {**d, "model": {}}
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
