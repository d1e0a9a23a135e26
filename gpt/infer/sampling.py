"""The per-row half of a decode step: each row (a sample, a beam, a server request's choice) has its
own settings, seeded generator, penalty counts, stop conditions and text stream, and ``choose``
picks every row's next token from the batch's logits.

    rows = [Row(settings, TextStream(tokenizer, settings.stop), generator) for _ in range(4)]
    tokens = choose(rows, logits[:, :vocab].float())     # (4,) logits -> a token id per row
    pieces = [row.accept(t) for row, t in zip(rows, tokens)]   # text safe to show now

Rows that share their settings and generator (the samples of one ``Generation``) are chosen in one
call with one draw of uniforms, so a seed gives the same text whatever the batch's size or order.
Logits pass, in this order: penalties -> temperature -> top_k -> top_p -> min_p -> sample.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt.infer.config import GenerationConfig
from gpt.infer.tools import ToolRunner


class TextStream:
    """One sample's text, built token by token: bytes -> whole UTF-8 characters -> stop strings.

    ``push`` returns the text that is safe to show now: never half a character, and never text that
    might still turn out to be the start of a stop string. A completed stop string ends the sample;
    it and the tokens overlapping it are dropped from ``text`` and ``ids``."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self._ends: list[int] = []  # len(text) after each token of ids
        self.text = ""
        self._shown = 0  # characters of text already returned
        self.finish_reason: str | None = None  # "stop" | "length" | "interrupted"
        self.logprob: float | None = None  # set by beam search

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def shown_tokens(self) -> int:
        """How many of ``ids`` the text returned so far covers entirely (per-token logprobs follow it)."""
        return bisect.bisect_right(self._ends, self._shown)

    def push(self, token: int) -> str:
        if self.finished:
            return ""
        piece = self._utf8.decode(self.tokenizer.decode_bytes([token]))
        self.ids.append(token)
        self._ends.append(len(self.text) + len(piece))
        self._append(piece)
        return self._release()

    def end(self, reason: str) -> str:
        """Finish (flushing an incomplete character as U+FFFD); return the text not yet shown."""
        if self.finished:
            return ""
        self._append(self._utf8.decode(b"", final=True))
        self.finish_reason = self.finish_reason or reason
        return self._release()

    def completion(self) -> Completion:
        return Completion(list(self.ids), self.text, self.finish_reason or "length", self.logprob)

    def _append(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        if not self.stop or not piece:
            return
        longest = max(map(len, self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, start - longest + 1))) >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            while self._ends and self._ends[-1] > cut:
                self._ends.pop()
                self.ids.pop()
            self.finish_reason = "stop"

    def _release(self) -> str:
        end = len(self.text)
        if not self.finished:  # hold back a tail that is a proper prefix of a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                       default=0)  # fmt: skip
            end = max(self._shown, end - hold)
        out, self._shown = self.text[self._shown : end], end
        return out


@dataclass
class Completion:
    ids: list[int]
    """Generated tokens (without the prompt, a stop token or the tokens of a stop string)."""
    text: str
    """Their text, cut exactly before a stop string."""
    finish_reason: str
    """'length' (max_new_tokens), 'stop' (a stop string or stop token) or 'interrupted'."""
    logprob: float | None = None
    """Beam search only: the total log-probability of the hypothesis."""


@dataclass
class Row:
    """One sequence being decoded and what ends it: a stop token, a stop string (in ``stream``) or
    ``config.max_new_tokens``. ``counts`` (V,) holds each token's occurrences in the prompt and the
    output so far, when a penalty needs them."""

    config: GenerationConfig
    stream: TextStream
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None
    stop_token_ids: frozenset[int] = frozenset()
    generated: int = 0
    last: int = 0
    """The token fed at the next step."""
    tools: ToolRunner | None = None
    """Runs the calls the row makes (``gpt.infer.tools``); None = calls are decoded as plain tokens."""
    forced: list[int] = field(default_factory=list)
    """Tokens the row takes next instead of sampling (a tool's result), one per decode step."""

    @property
    def finished(self) -> bool:
        return self.stream.finished

    def accept(self, token: int, forced: bool = False) -> str:
        """Record the row's next token (``forced``: one of ``forced``, never a stop token); the text
        that is safe to show now."""
        self.generated += 1
        self.last = token
        if self.counts is not None:
            self.counts[token] += 1
        stream = self.stream
        text = stream.end("stop") if token in self.stop_token_ids and not forced else stream.push(token)
        if self.tools is not None and not forced and not stream.finished:
            self.forced += self.tools.after(stream.ids)  # a result once the token ends a call
        if not stream.finished and self.generated >= self.config.max_new_tokens:
            text += stream.end("length")
        return text

    def next_forced(self, chosen: int) -> tuple[int, bool]:
        """(the token the row takes, whether it was forced): the next forced token, else ``chosen``."""
        return (self.forced.pop(0), True) if self.forced else (chosen, False)


def prompt_counts(cfg: GenerationConfig, prompt: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Token counts (V,) of the prompt ids (T,), when one of cfg's penalties needs them."""
    if cfg.repetition_penalty == 1.0 and not cfg.frequency_penalty and not cfg.presence_penalty:
        return None
    return torch.bincount(prompt, minlength=vocab_size)[:vocab_size].float()


def choose(rows: Sequence[Row], scores: torch.Tensor) -> torch.Tensor:
    """Each row's next token (B,) from float32 scores (B, V): rows that share settings and a
    generator are chosen together (penalties, then ``choose_next``)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((id(row.config), id(row.generator)), []).append(i)
    tokens = None if len(groups) == 1 else torch.empty(len(rows), dtype=torch.long, device=scores.device)
    for members in groups.values():
        first = rows[members[0]]
        group = scores if tokens is None else scores[members]
        if first.counts is not None:
            group = apply_penalties(group, torch.stack([rows[i].counts for i in members]), first.config)
        chosen = choose_next(group, first.config, first.generator)  # (len(members),)
        if tokens is None:
            return chosen
        tokens[members] = chosen
    assert tokens is not None
    return tokens


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Repetition (CTRL-style, multiplicative), frequency and presence (OpenAI-style, additive)
    penalties; counts (B, V) holds each token's occurrences in the prompt and output so far."""
    seen = counts > 0
    if cfg.repetition_penalty != 1.0:
        rp = cfg.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if cfg.frequency_penalty:
        logits = logits - cfg.frequency_penalty * counts
    if cfg.presence_penalty:
        logits = logits - cfg.presence_penalty * seen.float()
    return logits


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
                ) -> torch.Tensor:  # fmt: skip
    """Next token ids (B,) from float32 logits (B, V): greedy at temperature 0, else a sample after
    temperature, top_k, top_p and min_p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(distribution(logits, cfg), generator)


def distribution(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The probabilities (B, V), not normalised, that ``choose_next`` samples from at temperature > 0:
    float32 logits (B, V) after temperature, top_k, top_p and min_p (speculative decoding's p and q)."""
    # shift the best logit to 0 before dividing: a tiny temperature (1e-40) then gives 0 and -inf,
    # never inf / inf = NaN; and the divisor stays a finite normal float32 (1e-300 would round to 0,
    # 1e300 to inf)
    finfo = torch.finfo(logits.dtype)
    temperature = min(max(cfg.temperature, finfo.tiny), finfo.max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if 0 < cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p (the first is always kept)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if cfg.min_p > 0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row (B,) drawn from probs (B, V), which need not be normalised."""
    # inverse-CDF sampling, one uniform draw per row: the same distribution as torch.multinomial,
    # ~10x faster over a 50k vocabulary on the CPU (where multinomial takes ~2 ms a row); float64
    # sums (MPS has none: float32), so that 50k small probabilities add up without drift
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(wide).cumsum(dim=-1)  # (B, V), not normalised
    u = torch.rand((probs.size(0), 1), generator=generator, device=probs.device, dtype=wide)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first token whose cdf exceeds u
    return index.squeeze(-1).clamp_(max=probs.size(-1) - 1)
