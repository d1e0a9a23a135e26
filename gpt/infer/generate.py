"""The generation engine: sampling and beam search over the decoding core, with streamed text.

All ``num_samples`` rows are decoded together as one batch on a ``gpt.infer.engine.Decoder`` (KV
cache, prefill, decode steps, context shifting).

    from gpt.runs.load import load
    from gpt.infer.generate import Generation, GenerationConfig, generate

    loaded = load("out/shakespeare_char")
    model, tok = loaded.build(), loaded.tokenizer
    settings = GenerationConfig(max_new_tokens=200, temperature=0.8, top_k=50, stop=["\\n\\n"], seed=1)
    ids = generate(model, tok, tok.encode("ROMEO:"), settings)       # list[list[int]], one per sample
    for row, text in Generation(model, tok, tok.encode("ROMEO:"), settings):
        print(text, end="", flush=True)                              # text as it is generated

Text is streamed through an incremental UTF-8 decoder (a character split across tokens is never
printed half-way) and held back while it could still be the start of a stop string, so the streamed
text always equals the final text. The console front end (``sample.py``) is ``gpt.infer.sample``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from gpt.errors import ConfigError
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder, check_memory
from gpt.infer.sampling import Completion, Row, TextStream, apply_penalties, choose, prompt_counts
from gpt.infer.speculative import speculative_decode
from gpt.infer.tools import ToolRunner
from gpt.model import GPT


@torch.inference_mode()
def decode(decoder: Decoder, logits: torch.Tensor, rows: list[Row], beams: Beams | None = None
           ) -> Iterator[tuple[int, str]]:  # fmt: skip
    """The decode loop: from the logits (B, V) after the prompt, choose each row's token, yield
    ``(row, text)`` as it becomes safe to show, and step the decoder, until every row is finished or
    ``max_new_tokens``. With ``beams`` the rows are beam search's hypotheses (``Beams``): their text
    comes at the end."""
    cfg = rows[0].config
    vocab = min(rows[0].stream.tokenizer.vocab_size, logits.size(-1))  # padded rows are never chosen
    for step in range(cfg.max_new_tokens):
        scores = logits[:, :vocab].float()  # (B, V) in fp32 whatever the model's dtype
        if beams is None:
            tokens = choose(rows, scores)  # (B,)
            if any(row.forced for row in rows):  # a tool's result goes in instead of a sample
                taken = [row.next_forced(t) for row, t in zip(rows, tokens.tolist(), strict=True)]
                tokens = torch.tensor([t for t, _ in taken], device=tokens.device)
            else:
                taken = [(t, False) for t in tokens.tolist()]
            for i, (row, (token, forced)) in enumerate(zip(rows, taken, strict=True)):
                if piece := row.accept(token, forced):
                    yield i, piece
            if all(row.finished for row in rows):
                return
        else:
            tokens = beams.select(scores, step)
            if tokens is None:
                break
        if step + 1 < cfg.max_new_tokens:  # no forward for a token nobody will read
            if beams is not None:
                decoder.reorder(beams.index)
            logits = decoder.step(tokens)
    if beams is not None:
        yield from beams.finish(rows)


class Beams:
    """Beam search, a mode of ``decode``: keep the ``num_beams`` most likely partial continuations;
    a hypothesis ends at a stop token or stop string or at max_new_tokens, and finished ones are
    ranked by sum(log p) / length**length_penalty. Sampling controls (temperature, top_k, ...) do not
    apply; penalties do."""

    def __init__(self, cfg: GenerationConfig, tokenizer, stop_token_ids: set[int],
                 counts: torch.Tensor | None, device: torch.device):  # fmt: skip
        self.cfg, self.tokenizer, self.stop_token_ids = cfg, tokenizer, stop_token_ids
        width = cfg.num_beams
        self.counts = None if counts is None else counts.expand(width, -1).contiguous()  # (W, V)
        self.beams: list[list[int]] = [[]]  # generated ids of each live beam
        # every row starts as the same prompt: only row 0 may expand at the first step
        self.scores = torch.full((width,), float("-inf"), device=device)
        self.scores[0] = 0.0
        self.finished: list[tuple[float, float, list[int], str]] = []  # (rank, logprob, ids, reason)
        self.running = True  # False once nothing left could beat the finished hypotheses
        self.index = torch.zeros(width, dtype=torch.long, device=device)  # the rows the next step extends

    def rank(self, logprob: float, n: int) -> float:
        return logprob / max(n, 1) ** self.cfg.length_penalty

    def select(self, scores: torch.Tensor, step: int) -> torch.Tensor | None:
        """The next token of each beam (W,) from scores (W, V) (``index``: the rows they extend), or
        None when the search is over."""
        cfg, width, vocab = self.cfg, self.cfg.num_beams, scores.size(-1)
        if self.counts is not None:
            scores = apply_penalties(scores, self.counts, cfg)
        totals = F.log_softmax(scores, dim=-1) + self.scores[:, None]  # (W, V)
        top, flat = totals.view(-1).topk(min(2 * width, totals.numel()))
        live: list[tuple[int, int, float]] = []  # (beam, token, total log-prob)
        for total, index in zip(top.tolist(), flat.tolist(), strict=True):
            if total == float("-inf") or len(live) == width:
                break
            beam, token = divmod(index, vocab)
            ids = self.beams[beam] + [token]
            if token in self.stop_token_ids:
                self.finished.append((self.rank(total, len(ids)), total, ids[:-1], "stop"))
            elif cfg.stop and any(s in self.tokenizer.decode(ids) for s in cfg.stop):
                self.finished.append((self.rank(total, len(ids)), total, ids, "stop"))
            else:
                live.append((beam, token, total))
        self.finished = sorted(self.finished, key=lambda h: h[0], reverse=True)[:width]
        full = len(self.finished) == width
        if not live or (full and self.rank(live[0][2], step + 1) <= self.finished[-1][0]):
            self.running = False  # nothing left that could beat the finished hypotheses
            return None
        live += [(live[0][0], live[0][1], float("-inf"))] * (width - len(live))  # pad dead rows
        device = self.scores.device
        self.index = torch.tensor([b for b, _, _ in live], device=device)
        tokens = torch.tensor([t for _, t, _ in live], device=device)
        self.beams = [self.beams[b] + [t] for b, t, _ in live]
        self.scores = torch.tensor([s for _, _, s in live], device=device)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, self.index)
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        return tokens

    def finish(self, rows: list[Row]) -> Iterator[tuple[int, str]]:
        """The best hypotheses into the rows' streams, best first; yields each one's text."""
        if self.running:  # ran to max_new_tokens: the running beams are hypotheses too
            for ids, total in zip(self.beams, self.scores.tolist(), strict=True):
                if total > float("-inf"):
                    self.finished.append((self.rank(total, len(ids)), total, ids, "length"))
        self.finished.sort(key=lambda h: h[0], reverse=True)
        for i, (_, total, ids, reason) in enumerate(self.finished[: len(rows)]):
            stream = rows[i].stream
            stream.logprob = total
            text = "".join(stream.push(t) for t in ids) + stream.end(reason)
            if text:
                yield i, text


class Generation:
    """One run of the engine. Iterate it for ``(row, text)`` pieces as they are generated (beam
    search yields each row's text once, at the end); ``completions`` holds the result so far.

    ``tools`` (a ``gpt.infer.tools.ToolRunner``) runs each call a sample makes and forces its result
    into the sample (sampling only: not with beams or a drafter, where calls stay plain tokens).
    ``stop_token_ids`` end a row when sampled (the chat REPL passes the end-of-turn token); a
    ``generator`` may be shared across runs (the REPL seeds one per session), else one is seeded
    from ``config.seed``. A prompt longer than the context keeps its most recent ``block_size``
    tokens (``dropped`` says how many went); an empty prompt starts from <|endoftext|>."""

    def __init__(self, model: GPT, tokenizer, prompt_ids: Sequence[int],
                 config: GenerationConfig | None = None, *, stop_token_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 decoder: Decoder | None = None, drafter=None, tools: ToolRunner | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.tools = tools
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
        self.beam = cfg.num_beams > 1  # beam search (``beam_search`` sets it at width 1 too)
        # a decoder kept across runs (the chat REPL's, one row): its cache is reused where it holds
        # the start of this prompt (sampling with num_samples=1 only)
        reusable = decoder is not None and use_cache and rows == decoder.batch_size == 1
        self.decoder = decoder if reusable else None
        # speculative decoding (gpt.infer.speculative): an NgramDrafter or a ModelDrafter; None = off
        self.drafter = drafter
        if drafter is not None and (self.beam or cfg.num_samples > 1 or not use_cache):
            raise ConfigError("draft: speculative decoding draws one sample at a time with the KV cache; "
                              "set num_samples=1 and num_beams=1, or drop draft")  # fmt: skip

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
            yield from self._decode()
        finally:
            self.model.train(was_training)

    def _decode(self) -> Iterator[tuple[int, str]]:
        cfg, beams = self.config, None
        width = cfg.num_beams if self.beam else cfg.num_samples
        decoder = self.decoder or Decoder(self.model, width, cfg.context_shift, self.use_cache)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        # (width, V): the prompt runs once, shared by all rows (a kept decoder: only its new part)
        with torch.inference_mode():
            logits = decoder.prefill(prompt, reuse=self.decoder is not None)
        counts = prompt_counts(cfg, prompt[0], self.vocab_size)  # (V,) or None
        if self.beam:
            beams = Beams(cfg, self.tokenizer, self.stop_token_ids, counts, self.device)
            counts = None
        tools = None if self.beam or self.drafter is not None else self.tools
        rows = [Row(cfg, s, self.generator, None if counts is None else counts.clone(),
                    frozenset(self.stop_token_ids), tools=tools) for s in self.streams]  # fmt: skip
        if self.drafter is not None and not self.beam:  # beam_search sets beam after the check
            yield from speculative_decode(decoder, logits, rows[0], self.drafter, list(self.prompt_ids))
            return
        yield from decode(decoder, logits, rows, beams)


def greedy_batch(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 batch_size: int = 16, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 tools: ToolRunner | None = None) -> list[Completion]:  # fmt: skip
    """The greedy completion of each prompt (evaluation's decode): ``sample_batch`` at temperature 0."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, stop=list(stop))
    return sample_batch(model, tokenizer, prompts, cfg, None, batch_size, stop_token_ids, tools)


def sample_batch(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 generators: Sequence[torch.Generator | None] | None = None, batch_size: int = 16,
                 stop_token_ids: Sequence[int] = (), tools: ToolRunner | None = None
                 ) -> list[Completion]:  # fmt: skip
    """The completion of each prompt under ``config`` (one sample each: repeat a prompt for several;
    no beams), ended by a stop string or stop token or max_new_tokens; ``tools`` runs the calls a
    reply makes, as ``Generation``'s. Prompts of equal length decode together, ``batch_size`` rows at
    most (equal rows: no attention mask). ``generators[i]`` draws prompt i's tokens; rows that share a
    generator draw together, in row order, as ``Generation``'s ``num_samples`` rows do (GRPO's groups).
    A prompt longer than the context keeps its last block_size tokens, as ``Generation``."""
    block, device = model.config.block_size, model.lm_head.weight.device
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    prompts = [list(p)[-block:] or [tokenizer.eot_id] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out: list[Completion] = [Completion([], "", "length")] * len(prompts)
    groups = [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]
    stops = frozenset(stop_token_ids)
    for group in groups:
        decoder = Decoder(model, len(group))
        with torch.inference_mode():
            logits = decoder.prefill(torch.tensor([prompts[i] for i in group], device=device))  # (B, V)
        rows = [Row(config, TextStream(tokenizer, config.stop), generators[i] if generators else None,
                    prompt_counts(config, torch.tensor(prompts[i]), vocab), stops, tools=tools)
                for i in group]  # fmt: skip
        for _ in decode(decoder, logits, rows):
            pass
        for i, row in zip(group, rows, strict=True):
            out[i] = row.stream.completion()
    return out


def generate(model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None,
             **kw) -> list[list[int]]:
    """The generated token ids of each sample (the prompt not included)."""
    return [c.ids for c in Generation(model, tokenizer, prompt_ids, config, **kw).run()]


def generate_text(model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None,
                  **kw) -> list[str]:
    """The generated text of each sample (the prompt not included)."""
    return [c.text for c in Generation(model, tokenizer, prompt_ids, config, **kw).run()]


def beam_search(model: GPT, tokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None,
                **kw) -> list[Completion]:
    """Beam search of width ``config.num_beams``, 1 included (which is greedy search); the
    ``num_samples`` best hypotheses, best first, each with its total ``logprob``."""
    gen = Generation(model, tokenizer, prompt_ids, config, **kw)
    gen.beam = True  # also at width 1
    return gen.run()
