"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them all in one
forward over its KV cache, and the standard rule (Leviathan et al. 2023, Chen et al. 2023) keeps a
prefix of them, so that the text is distributed exactly as the target's own (greedy: the same text,
token for token) while most steps cost one target forward for several tokens.

Drafters: ``NgramDrafter`` (prompt lookup: the tokens that followed the latest earlier occurrence of
the context's last n tokens; no second model) and ``ModelDrafter`` (a small model with the same
tokenizer, its own one-row ``Decoder``). ``drafter_from("ngram" | RUN, ...)`` builds either.

    drafter = drafter_from("ngram", draft_tokens=4, draft_ngram=3, model=model, tokenizer=tok)
    texts = generate_text(model, tok, ids, settings, drafter=drafter)   # gpt.infer.generate

Sampling controls apply to p (the target's) as in plain decoding: penalties (with the counts of the
drafted tokens before each position), temperature, top_k, top_p, min_p; q (the draft model's) takes
the same temperature and truncations. One sample at a time: beam search and num_samples > 1 refuse.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt.errors import CheckpointError, ConfigError
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder
from gpt.infer.sampling import Row, apply_penalties, choose, distribution, draw
from gpt.model import GPT
from gpt.runs.load import load


class NgramDrafter:
    """Prompt-lookup drafting: find the latest earlier occurrence of the context's last n tokens (n from
    ``ngram`` down to 1) and propose the (up to k) tokens that followed it; q is a point mass."""

    def __init__(self, draft_tokens: int, ngram: int):
        self.k, self.ngram = draft_tokens, ngram

    def propose(self, context: list[int], k: int, cfg: GenerationConfig, generator: torch.Generator | None
                ) -> tuple[list[int], torch.Tensor | None]:  # fmt: skip
        """Up to k drafted tokens and their q (None: each is certain)."""
        for n in range(min(self.ngram, len(context) - 1), 0, -1):
            tail = context[-n:]
            last = tail[-1]
            for start in range(len(context) - n - 1, -1, -1):  # latest first, before the tail itself
                if context[start + n - 1] == last and context[start : start + n] == tail:
                    return context[start + n : start + n + k], None
        return [], None


class ModelDrafter:
    """A draft model run ahead of the target on its own one-row decoder: it sees a recent window of
    the context (re-filled when the window and k drafts would outgrow its block_size) and samples k
    tokens with the target's temperature and truncations; q (k, V) is what it sampled them from."""

    def __init__(self, model: GPT, draft_tokens: int, vocab: int):
        self.model, self.k, self.vocab = model.eval(), draft_tokens, vocab
        self.block_size = model.config.block_size
        if draft_tokens >= self.block_size:
            raise ConfigError(f"draft_tokens={draft_tokens} must be below the draft model's context "
                              f"({self.block_size} tokens); lower draft_tokens")  # fmt: skip
        self.decoder = Decoder(model, 1)
        self.start = 0  # the window: context[start:] is what its decoder holds (and is fed)

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, cfg: GenerationConfig, generator: torch.Generator | None
                ) -> tuple[list[int], torch.Tensor | None]:  # fmt: skip
        if self.start >= len(context) or len(context) - self.start + k > self.block_size:
            # a new window with a quarter of the context to spare: re-filled once in a while
            self.start = max(0, len(context) - max(1, self.block_size - k - self.block_size // 4))
        window = torch.tensor([context[self.start :]], device=self.decoder.context.device)
        logits = self.decoder.prefill(window, reuse=True)  # runs only what its cache lacks
        drafts, qs = [], []
        for i in range(k):
            scores = logits[:, : self.vocab].float()  # (1, V)
            if cfg.temperature == 0:  # greedy: the target keeps its argmax, q is not read
                token = scores.argmax(-1)
            else:
                q = distribution(scores, cfg).double()
                qs.append(q / q.sum(-1, keepdim=True))
                token = draw(q, generator)
            drafts.append(int(token))
            if i + 1 < k:
                logits = self.decoder.step(token)
        return drafts, torch.cat(qs) if qs else None


def drafter_from(draft: str, draft_tokens: int, draft_ngram: int, model: GPT, tokenizer, key: str = "draft"
                 ) -> NgramDrafter | ModelDrafter:  # fmt: skip
    """``ngram`` or a model reference (gpt.runs.load) with the same tokenizer as the target ``model``,
    built on its device and dtype."""
    if draft == "ngram":
        return NgramDrafter(draft_tokens, draft_ngram)
    try:
        loaded = load(draft)
    except CheckpointError as e:  # name the key: the model's own reference loaded fine
        raise CheckpointError(f"{key}={draft}: {e}") from None
    if loaded.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ConfigError(f"{key}={draft} has a different tokenizer from the model's; a draft model must "
                          "share the target's tokenizer (or use draft=ngram)")  # fmt: skip
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    if min(tokenizer.vocab_size, loaded.config.vocab_size) != vocab:
        raise ConfigError(f"{key}={draft} scores {loaded.config.vocab_size} tokens, the model "
                          f"{model.config.vocab_size}: they must cover the same vocabulary")  # fmt: skip
    weight = model.lm_head.weight
    return ModelDrafter(loaded.build(weight.device).to(weight.dtype), draft_tokens, vocab)


def accept(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], generator: torch.Generator | None
           ) -> tuple[int, int]:  # fmt: skip
    """The standard rule: p (k+1, V) the target's normalised probabilities at each drafted position and
    after the last, q (k, V) the draft's (None: point masses on the drafts). Keep draft x with
    probability min(1, p(x)/q(x)); at the first rejection draw from norm(max(0, p - q)), else the
    bonus token from p[k]. Returns (drafts kept, the next token)."""
    k = len(drafts)
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype).tolist() if k else []
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), 1.0 if q is None else float(q[i, x])
        if u[i] * qx < px:  # u < p/q without dividing: accepted
            continue
        residual = p[i].clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = (residual - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection was rounding too
            residual = p[i]
        return i, int(draw(residual[None], generator))
    return k, int(draw(p[k : k + 1], generator))


def greedy_accept(scores: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """Temperature 0: drafts are kept while they are the target's argmax; the next token is the
    target's argmax after the last kept one (scores (k+1, V))."""
    best = scores.argmax(-1).tolist()
    n = next((i for i, (x, b) in enumerate(zip(drafts, best, strict=False)) if x != b), len(drafts))
    return n, best[n]


def verify(row: Row, scores: torch.Tensor, drafts: list[int], q: torch.Tensor | None) -> tuple[int, int]:
    """Scores (k+1, V) of the target after the fed token and each draft; (drafts kept, next token)."""
    cfg = row.config
    if row.counts is not None:  # position i has seen the first i drafts too
        steps = torch.zeros_like(scores)
        steps[torch.arange(1, len(drafts) + 1), torch.tensor(drafts)] = 1.0
        scores = apply_penalties(scores, row.counts + steps.cumsum(0), cfg)
    if cfg.temperature == 0:
        return greedy_accept(scores, drafts)
    p = distribution(scores, cfg).double()
    return accept(p / p.sum(-1, keepdim=True), q, drafts, row.generator)


@torch.inference_mode()
def speculative_decode(decoder: Decoder, logits: torch.Tensor, row: Row, drafter, context: list[int]
                       ) -> Iterator[tuple[int, str]]:  # fmt: skip
    """``gpt.infer.generate.decode`` for one row with drafts: from the logits (1, V) after the prompt
    ``context`` (ids, extended in place), yield ``(0, text)`` until the row is finished. Where the
    target's cache has no room for the drafts (near block_size) a plain step runs, which slides the
    window exactly as plain decoding does."""
    cfg = row.config
    vocab = min(row.stream.tokenizer.vocab_size, logits.size(-1))
    token = int(choose([row], logits[:, :vocab].float()))
    while True:  # token: chosen, not yet in the cache
        if piece := row.accept(token):
            yield 0, piece
        if row.finished:
            return
        context.append(token)
        length = decoder.lengths[0]
        room = min(drafter.k, decoder.block_size - length - 1, cfg.max_new_tokens - row.generated - 1)
        drafts, q = drafter.propose(context, room, cfg, row.generator) if room > 0 else ([], None)
        if not drafts:
            logits = decoder.step(torch.tensor([token], device=logits.device))
            token = int(choose([row], logits[:, :vocab].float()))
            continue
        fed = torch.tensor([[token, *drafts]], device=logits.device)  # (1, k+1)
        scores = decoder.extend(fed)[0, :, :vocab].float()  # (k+1, V)
        n, token = verify(row, scores, drafts, q)
        decoder.truncate(length + 1 + n)  # the fed token and the kept drafts
        for t in drafts[:n]:
            if piece := row.accept(t):
                yield 0, piece
            if row.finished:
                return
            context.append(t)
