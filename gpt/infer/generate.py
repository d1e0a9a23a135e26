"""The generation engine: sampling and beam search over the decoding core, with streamed text.

All ``num_samples`` rows are decoded together as one batch on a ``gpt.infer.engine.Decoder`` (KV
cache, prefill, decode steps, context shifting).

    from gpt.runs.load import load_model
    from gpt.infer.generate import GenerationConfig, generate, stream

    model, tok, _ = load_model("out/shakespeare_char")
    settings = GenerationConfig(max_new_tokens=200, temperature=0.8, top_k=50, stop=["\\n\\n"], seed=1)
    ids = generate(model, tok, tok.encode("ROMEO:"), settings)       # list[list[int]], one per sample
    for row, text in stream(model, tok, tok.encode("ROMEO:"), settings):
        print(text, end="", flush=True)                              # text as it is generated

Text is streamed through an incremental UTF-8 decoder (a character split across tokens is never
printed half-way) and held back while it could still be the start of a stop string, so the streamed
text always equals the final text. The console front end (``sample.py``) is ``gpt.infer.sample``.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder, KVCache, apply_penalties, check_memory, choose_next
from gpt.model import GPT

__all__ = [
    "Completion",
    "Decoder",
    "Generation",
    "GenerationConfig",
    "KVCache",
    "TextStream",
    "apply_penalties",
    "beam_search",
    "choose_next",
    "generate",
    "generate_text",
    "stream",
]


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
            hold = max(
                (k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0
            )
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


class Generation:
    """One run of the engine. Iterate it for ``(row, text)`` pieces as they are generated (beam
    search yields each row's text once, at the end); ``completions`` holds the result so far.

    ``stop_token_ids`` end a row when sampled (the chat REPL passes the end-of-turn token); a
    ``generator`` may be shared across runs (the REPL seeds one per session), else one is seeded
    from ``config.seed``. A prompt longer than the context keeps its most recent ``block_size``
    tokens (``dropped`` says how many went); an empty prompt starts from <|endoftext|>."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        *,
        stop_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        decoder: Decoder | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = config or GenerationConfig()
        ids = list(prompt_ids) or [tokenizer.eot_id]
        block_size = model.config.block_size
        self.dropped = max(0, len(ids) - block_size)
        self.prompt_ids = ids[-block_size:]
        self.stop_token_ids = set(stop_token_ids)
        self.use_cache = use_cache
        self.device = model.lm_head.weight.device
        # padded embedding rows beyond the tokenizer's vocabulary are never sampled
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(cfg.seed) if cfg.seed is not None else generator.seed()
        self.generator = generator
        rows, key = (cfg.num_beams, "num_beams") if cfg.num_beams > 1 else (cfg.num_samples, "num_samples")
        if use_cache:  # before any allocation: an impossible batch is one line, not an OOM
            check_memory(model, rows, key)
        self.streams = [TextStream(tokenizer, cfg.stop) for _ in range(cfg.num_samples)]
        # a decoder kept across runs (the chat REPL's, one row): its cache is reused where it holds
        # the start of this prompt (sampling with num_samples=1 only)
        reusable = decoder is not None and use_cache and rows == decoder.batch_size == 1
        self.decoder = decoder if reusable else None

    @property
    def completions(self) -> list[Completion]:
        return [s.completion() for s in self.streams]

    def run(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions

    def __iter__(self) -> Iterator[tuple[int, str]]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._beam_search() if self.config.num_beams > 1 else self._sample()
        finally:
            self.model.train(was_training)

    def _start(self, rows: int) -> tuple[Decoder, torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        decoder = self.decoder or Decoder(self.model, rows, cfg.context_shift, self.use_cache)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        # (rows, V): the prompt runs once, shared by all rows (a kept decoder: only its new part)
        logits = decoder.prefill(prompt, reuse=self.decoder is not None)
        counts = None
        if cfg.repetition_penalty != 1.0 or cfg.frequency_penalty or cfg.presence_penalty:
            counts = torch.bincount(prompt[0], minlength=self.vocab_size)[: self.vocab_size]
            counts = counts.float().expand(rows, -1).contiguous()  # (rows, V)
        return decoder, logits, counts

    def _scores(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        scores = logits[:, : self.vocab_size].float()  # (B, V) in fp32 whatever the model's dtype
        return scores if counts is None else apply_penalties(scores, counts, self.config)

    @torch.inference_mode()
    def _sample(self) -> Iterator[tuple[int, str]]:
        cfg, streams = self.config, self.streams
        decoder, logits, counts = self._start(cfg.num_samples)
        for step in range(cfg.max_new_tokens):
            next_ids = choose_next(self._scores(logits, counts), cfg, self.generator)  # (B,)
            if counts is not None:
                counts.scatter_add_(1, next_ids[:, None], torch.ones_like(counts[:, :1]))
            for row, token in enumerate(next_ids.tolist()):
                stream = streams[row]
                piece = stream.end("stop") if token in self.stop_token_ids else stream.push(token)
                if piece:
                    yield row, piece
            if all(s.finished for s in streams):
                return
            if step + 1 < cfg.max_new_tokens:  # no forward for a token nobody will read
                logits = decoder.step(next_ids)
        for row, stream in enumerate(streams):
            if piece := stream.end("length"):
                yield row, piece

    @torch.inference_mode()
    def _beam_search(self) -> Iterator[tuple[int, str]]:
        """Keep the ``num_beams`` most likely partial continuations; a hypothesis ends at a stop
        token or stop string or at max_new_tokens, and finished ones are ranked by
        sum(log p) / length**length_penalty. Sampling controls (temperature, top_k, ...) do not
        apply; penalties do."""
        cfg, width, vocab = self.config, self.config.num_beams, self.vocab_size
        decoder, logits, counts = self._start(width)
        beams: list[list[int]] = [[]]  # generated ids of each live beam
        # every row starts as the same prompt: only row 0 may expand at the first step
        scores = torch.full((width,), float("-inf"), device=self.device)
        scores[0] = 0.0
        finished: list[tuple[float, float, list[int], str]] = []  # (rank, logprob, ids, reason)
        rank = lambda logprob, n: logprob / max(n, 1) ** cfg.length_penalty
        for step in range(cfg.max_new_tokens):
            totals = F.log_softmax(self._scores(logits, counts), dim=-1) + scores[:, None]  # (W, V)
            top, flat = totals.view(-1).topk(min(2 * width, totals.numel()))
            live: list[tuple[int, int, float]] = []  # (beam, token, total log-prob)
            for total, index in zip(top.tolist(), flat.tolist(), strict=True):
                if total == float("-inf") or len(live) == width:
                    break
                beam, token = divmod(index, vocab)
                ids = beams[beam] + [token]
                if token in self.stop_token_ids:
                    finished.append((rank(total, len(ids)), total, ids[:-1], "stop"))
                elif cfg.stop and any(s in self.tokenizer.decode(ids) for s in cfg.stop):
                    finished.append((rank(total, len(ids)), total, ids, "stop"))
                else:
                    live.append((beam, token, total))
            finished = sorted(finished, key=lambda h: h[0], reverse=True)[:width]
            if not live or (len(finished) == width and rank(live[0][2], step + 1) <= finished[-1][0]):
                live = []  # nothing left that could beat the finished hypotheses
                break
            live += [(live[0][0], live[0][1], float("-inf"))] * (width - len(live))  # pad dead rows
            index = torch.tensor([b for b, _, _ in live], device=self.device)
            tokens = torch.tensor([t for _, t, _ in live], device=self.device)
            beams = [beams[b] + [t] for b, t, _ in live]
            scores = torch.tensor([s for _, _, s in live], device=self.device)
            if counts is not None:
                counts = counts.index_select(0, index)
                counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
            if step + 1 < cfg.max_new_tokens:
                decoder.reorder(index)
                logits = decoder.step(tokens)
        if live:  # ran to max_new_tokens: the running beams are hypotheses too
            for ids, total in zip(beams, scores.tolist(), strict=True):
                if total > float("-inf"):
                    finished.append((rank(total, len(ids)), total, ids, "length"))
        finished.sort(key=lambda h: h[0], reverse=True)
        for row, (_, total, ids, reason) in enumerate(finished[: cfg.num_samples]):
            stream = self.streams[row]
            stream.logprob = total
            text = "".join(stream.push(t) for t in ids) + stream.end(reason)
            if text:
                yield row, text


def stream(
    model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None, **kw
) -> Generation:
    """A ``Generation``: iterate it for ``(row, text)`` pieces; ``.completions`` afterwards."""
    return Generation(model, tokenizer, prompt_ids, config, **kw)


def generate(
    model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None, **kw
) -> list[list[int]]:
    """The generated token ids of each sample (the prompt not included)."""
    return [c.ids for c in Generation(model, tokenizer, prompt_ids, config, **kw).run()]


def generate_text(
    model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None, **kw
) -> list[str]:
    """The generated text of each sample (the prompt not included)."""
    return [c.text for c in Generation(model, tokenizer, prompt_ids, config, **kw).run()]


def beam_search(
    model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None, **kw
) -> list[Completion]:
    """Beam search of width ``config.num_beams``, 1 included (which is greedy search); the
    ``num_samples`` best hypotheses, best first, each with its total ``logprob``."""
    gen = Generation(model, tokenizer, prompt_ids, config, **kw)
    for _ in gen._beam_search():
        pass
    return gen.completions
