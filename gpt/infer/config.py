"""Typed configuration of the inference side: the generation controls (``gpt.infer.generate``,
usable from Python), sample.py's run config and the server's: every key, its default and its doc
(``python sample.py --help`` and ``gpt serve --help`` print them).

Built like the training run's config (``gpt.config``): ``SampleConfig.from_dict(d)`` on the dict
Hydra resolved; bad keys, types and values raise ``ConfigError`` naming the key.

    from gpt.infer.config import GenerationConfig
    gen = GenerationConfig(max_new_tokens=100, temperature=0.7, stop=["\n\n"])
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from gpt.errors import ConfigError
from gpt.infer.tools import toolbox
from gpt.quant import Quantize
from gpt.typed_config import Dtype, check_ranges, finite, from_dict

DEFAULT_TOOLS = ("calculator",)
"""The tools a chat runs unless told otherwise (sample.py's and gpt eval dialogs' ``tools``)."""


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
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range setting."""
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
        check_ranges("", self, checks)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise ConfigError(
                f"num_samples={self.num_samples} exceeds num_beams={self.num_beams}: beam search returns "
                "at most num_beams hypotheses; raise num_beams or lower num_samples"
            )


@dataclass
class SampleConfig(GenerationConfig):
    """sample.py's configuration: the generation controls (all changeable live with /set in
    interactive mode) plus where the model comes from and how to run it."""

    seed: int | None = 1337
    """Same seed, same samples (the library default is None: a fresh seed each call)."""
    ckpt: str = "out/shakespeare_char"
    """The model: a run directory, a checkpoint file, a LoRA run or hf:DIR (gpt.runs.load)."""
    prompt: str = ""
    """Text to continue, verbatim; empty = start from <|endoftext|>."""
    prompt_file: str | None = None
    """Read the prompt from this UTF-8 file instead (a pipe, /dev/stdin; - = stdin)."""
    mode: Literal["generate", "interactive", "chat"] = "generate"
    """generate: print the samples and exit; interactive: a prompt loop with live settings; chat: a
    conversation with an instruction-tuned model (with a prompt: print just the reply and exit)."""
    system: str | None = None
    """mode=chat: the system prompt (kept when old turns are dropped to fit the context)."""
    tools: list[str] | None = field(default_factory=lambda: list(DEFAULT_TOOLS))
    """mode=chat: the built-in tools (gpt.infer.tools) run inside a reply when the model calls one
    (its result is forced into the reply); none or [] = calls stay plain text. Only for models whose
    tokenizer has the tool-call tokens."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """Weights' dtype for inference; auto = bf16 (else fp16) on CUDA, bf16 on CPUs with native bf16
    (AVX512-BF16/AMX), fp32 elsewhere."""
    quantize: Quantize = "none"
    """none | int8: int8 weights, one scale per output channel, activations in dtype (gpt.quant): a
    batch-1 decode step reads half the bytes of bf16 (1.6-1.9x its tokens/s on a CPU: bench/bench_int8.py)."""
    compile: bool = False
    """torch.compile the one-token decode step (gpt.infer.engine.compile_decode): weights frozen into
    the compiled code, about 30 s of compiling at the first step for GPT-2 124M on a CPU, then +10%
    tokens/s at batch 1 and +25-30% at batch 16 there (bf16, 1 thread: docs/benchmarks.md, "The batch-1
    decode step"); prefills stay eager. Not CUDA graphs: the cache's length changes every token. With
    draft: the draft model's steps are compiled, not the model's (it checks the drafts eagerly, whose
    rounding its one-token steps must share for greedy text to stay plain decoding's)."""
    echo_prompt: bool = True
    """mode=generate: print the prompt before each sample's continuation."""
    history_file: str | None = "~/.gpt_history"
    """mode=interactive: readline history file; null = no history kept across sessions."""
    draft: str | None = None
    """Speculative decoding (gpt.infer.speculative): ngram = draft tokens copied from where the context's
    last tokens occurred before (no second model), or a draft model with the same tokenizer (a run
    directory, checkpoint, LoRA run or hf:DIR); the model checks the drafts in one forward and keeps
    its own distribution exactly (greedy: the same text). One sample, no beams; null = off."""
    draft_tokens: int = 4
    """Tokens drafted per step (draft set)."""
    draft_ngram: int = 3
    """draft=ngram: the longest n-gram looked up (then shorter ones, down to 1)."""

    def validate(self) -> None:
        super().validate()
        checks = [
            ("draft_tokens", 1 <= self.draft_tokens <= 64, "must be in [1, 64]"),
            ("draft_ngram", 1 <= self.draft_ngram <= 64, "must be in [1, 64]"),
        ]
        check_ranges("", self, checks)
        toolbox(self.tools or [])  # an unknown tool: one line before the model loads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleConfig:
        return from_dict(cls, d)

    def generation(self) -> GenerationConfig:
        """The generation controls alone (stop strings verbatim, as every free-text value)."""
        names = [f.name for f in dataclasses.fields(GenerationConfig)]
        return GenerationConfig(**{name: getattr(self, name) for name in names})


@dataclass
class ServeConfig:
    """``gpt serve``'s configuration: the model, the address and the limits of the OpenAI-compatible
    server (``gpt.serve``)."""

    ckpt: str = "out/shakespeare_char"
    """Run directory, checkpoint file, LoRA run (adapters applied) or hf:DIR to serve."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback is reachable from other machines (a warning says so)."""
    port: int = 8000
    """TCP port (0 = any free port)."""
    model_name: str | None = None
    """The name clients give as ``model``; None = the checkpoint directory's name."""
    api_key: str | None = None
    """When set, /v1/* requires ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Names besides the bound address, localhost, 127.0.0.1 and [::1] that the Host header may give
    (any port; "*" = any): a request naming another host gets 403, which stops DNS rebinding. Add the
    names clients use to reach a server bound to a non-loopback address, or behind a proxy."""
    cors_origins: list[str] = field(default_factory=list)
    """Web origins (e.g. "http://localhost:3000") whose pages may call the API from a browser; none
    by default: no CORS headers are sent."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """Weights: auto (bf16, else fp16, on CUDA; else fp32) | fp32 | bf16 | fp16."""
    quantize: Quantize = "none"
    """none | int8: int8 weights with activations in dtype, as sample.py's quantize (gpt.quant)."""
    compile: bool = SampleConfig.compile
    """torch.compile the decode step, as sample.py's compile (the first request pays the compile)."""
    max_batch: int = 16
    """Rows decoded together (a request with n choices takes n rows)."""
    max_queue: int = 64
    """Requests that may wait for rows; beyond that a request gets 429 (one asking for more prompts
    than this gets 400: it can never fit)."""
    max_tokens: int | None = None
    """The most tokens a request may ask for; None = the context length. Also the default."""
    max_n: int = 8
    """The most choices (``n``) one request may ask for (at most max_batch)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 beyond)."""
    shutdown_timeout: float = 30.0
    """On SIGTERM: seconds granted to in-flight requests before the server exits."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """debug (with access log) | info | warning | error."""
    draft: str | None = None
    """Speculative decoding (gpt.infer.speculative) for a request alone in the batch (batched rows decode
    plainly): ngram = prompt lookup, or a draft model with the model's tokenizer (a run directory,
    checkpoint, LoRA run or hf:DIR), loaded at start; null = off."""
    draft_tokens: int = SampleConfig.draft_tokens
    """Tokens drafted per step (draft set)."""
    draft_ngram: int = SampleConfig.draft_ngram
    """draft=ngram: the longest n-gram looked up (then shorter ones, down to 1)."""

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535] (0 = any free port)"),
            ("max_batch", self.max_batch >= 1, "must be >= 1"),
            ("max_queue", self.max_queue >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1 or null"),
            ("max_n", self.max_n >= 1, "must be >= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("shutdown_timeout", self.shutdown_timeout >= 0, "must be >= 0"),
            ("draft_tokens", 1 <= self.draft_tokens <= 64, "must be in [1, 64]"),
            ("draft_ngram", 1 <= self.draft_ngram <= 64, "must be in [1, 64]"),
        ]
        check_ranges("", self, checks)
        self.max_n = min(self.max_n, self.max_batch)  # n choices take n rows of the batch

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        return from_dict(cls, d)


def unescape(text: str) -> str:
    r"""Turn the two-character sequences \n, \t and \\ into a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
