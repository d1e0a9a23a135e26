"""The decoding core: a preallocated KV cache, prefill/decode steps with context shifting, and
the choice of the next token under the sampling controls.

A prompt is run through the model once (the prefill), which fills the cache; then each new token
costs one single-token forward (a decode step). When prompt + output outgrow ``block_size``, the
oldest ``context_shift`` tokens are dropped and the cache is re-filled from the most recent context,
so generation goes on for as long as asked, for learned and rotary positions alike. Streams of text,
stop strings and beam search are built on top of this in ``gpt.infer.generate``.

    decoder = Decoder(model, batch_size=4)
    logits = decoder.prefill(prompt)                 # (4, vocab) for the next position
    next_ids = choose_next(logits, counts, settings, generator)
    logits = decoder.step(next_ids)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gpt.errors import ConfigError
from gpt.infer.config import GenerationConfig
from gpt.model import GPT, GPTConfig


class KVCache:
    """Preallocated keys and values, one (B, n_head, block_size, head_size) tensor each per layer.

    ``pos`` counts the positions already cached; the model reads it and calls ``update`` for every
    layer, then the caller advances ``pos``. A forward of fewer rows than the cache holds (a prompt
    prefilled once for all samples) uses the first rows; ``fill_rows`` then copies row 0 to the rest."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, nh, T, hs) at [pos, pos + T); return the cached (b, nh, pos + T, hs)."""
        b, end = k.size(0), self.pos + k.size(2)
        self.k[layer][:b, :, self.pos : end] = k
        self.v[layer][:b, :, self.pos : end] = v
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def fill_rows(self) -> None:
        """Copy row 0's cached positions into every other row."""
        for t in (*self.k, *self.v):
            t[1:, :, : self.pos] = t[:1, :, : self.pos]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search keeps the extensions of the best beams)."""
        for t in (*self.k, *self.v):
            live = t[:, :, : self.pos]
            live.copy_(live.index_select(0, index))


class RaggedKVCache:
    """A KV cache whose rows have their own lengths: a batch of independent requests (the server's
    continuous batching). Rows ``[start, rows)`` take part in a forward (all rows in use for a decode
    step; the new ones for a batched prefill, see ``add_rows``); ``begin(T)`` prepares it (the new
    tokens' positions (b, T) and the attention mask (b, 1, T, pos + T) that the model reads),
    ``advance`` records them. A row is filled with ``load_row`` from a one-row ``KVCache`` or by
    ``add_rows`` and a forward, copied with ``copy_row``, and freed with ``drop_row``, which moves the
    last row into its place so that the rows in use stay ``[0, rows)``."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size, self.device = batch_size, device
        self.lengths = [0] * batch_size  # cached positions of each row
        self.start = self.rows = 0
        self.pos = 0  # the longest row of the forward (the model checks pos + T <= block_size)
        self.positions: torch.Tensor | None = None
        self.attn_mask: torch.Tensor | None = None

    def begin(self, T: int) -> None:
        lengths = torch.tensor(self.lengths[self.start : self.rows], device=self.device)
        self.pos = max(self.lengths[self.start : self.rows])
        self.positions = lengths[:, None] + torch.arange(T, device=self.device)  # (b, T)
        keys = torch.arange(self.pos + T, device=self.device)
        # query t of row b sees the row's cached keys and the new ones up to itself: key j <= positions[b, t]
        self.attn_mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (b, 1, T, pos + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, nh, T, hs) at each row's own positions; return (b, nh, pos + T, hs)."""
        rows = torch.arange(self.start, self.rows, device=self.device)[
            :, None
        ]  # (b, 1) with positions (b, T)
        self.k[layer][rows, :, self.positions] = k.transpose(1, 2)  # indexed as (b, T, nh, hs)
        self.v[layer][rows, :, self.positions] = v.transpose(1, 2)
        end = self.pos + k.size(2)
        return self.k[layer][self.start : self.rows, :, :end], self.v[layer][self.start : self.rows, :, :end]

    def advance(self, T: int | list[int]) -> None:
        """The forward's rows hold T more positions (or T[i] for row start + i: a padded prefill);
        the next forward is a decode step over every row."""
        for i, row in enumerate(range(self.start, self.rows)):
            self.lengths[row] += T if isinstance(T, int) else T[i]
        self.positions = self.attn_mask = None
        self.start = 0

    def add_rows(self, count: int) -> int:
        """Take ``count`` empty rows; the next forward runs over them alone (a batched prefill of
        right-padded prompts: the padding's keys lie beyond each row's length, never attended)."""
        self.start = self.rows
        for row in range(self.rows, self.rows + count):
            self.lengths[row] = 0
        self.rows += count
        return self.start

    def load_row(self, source: KVCache) -> int:
        """Take the next free row, fill it with row 0 of ``source`` (its ``pos`` positions); its index."""
        row, length = self.rows, source.pos
        for own, other in zip((*self.k, *self.v), (*source.k, *source.v)):
            own[row, :, :length] = other[0, :, :length]
        self.lengths[row] = length
        self.rows += 1
        return row

    def copy_row(self, source: int) -> int:
        """Take the next free row as a copy of row ``source``; its index."""
        row, length = self.rows, self.lengths[source]
        for t in (*self.k, *self.v):
            t[row, :, :length] = t[source, :, :length]
        self.lengths[row] = length
        self.rows += 1
        return row

    def drop_row(self, row: int) -> None:
        """Free ``row``: the last row in use moves into its place (callers renumber it)."""
        last = self.rows - 1
        if row != last:
            length = self.lengths[last]
            for t in (*self.k, *self.v):
                t[row, :, :length] = t[last, :, :length]
            self.lengths[row] = length
        self.lengths[last] = 0
        self.rows -= 1


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate (a CPU: available RAM); None where it cannot be told."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError, RuntimeError):
        pass
    return None


def check_memory(model: GPT, rows: int, key: str) -> None:
    """ConfigError naming ``key`` when ``rows`` decoded together cannot fit in free memory: each row
    holds its KV cache (2 x n_layer x block_size x n_embd) and a few (vocab,) float32 score rows."""
    config, weight = model.config, model.lm_head.weight
    per_row = 2 * config.n_layer * config.block_size * config.n_embd * weight.element_size()
    per_row += 8 * config.vocab_size * 4 + 8 * config.block_size
    free = free_memory(weight.device)
    if free is not None and rows * per_row > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ConfigError(
            f"{key}={rows} needs about {gib(rows * per_row)} for decoding, more than the {gib(free)} free "
            f"on {weight.device.type}; at most {max(1, free // per_row)} fit: lower {key}"
        )


class Decoder:
    """Runs the model over a growing context: ``prefill`` a prompt, then ``step`` one token at a time;
    both return the next-token logits (B, vocab). With ``use_cache=False`` every step re-runs the whole
    context instead (the reference the cache is tested and benchmarked against).

    When the context is full (``block_size`` tokens) and a token arrives, the oldest tokens are
    dropped so that ``block_size + 1 - shift`` remain, and the window is re-filled from scratch:
    positions restart at 0, which learned position tables need. ``shift=1`` is an exact sliding
    window (a re-fill every token); the default, a quarter of the block, amortises re-fills."""

    def __init__(self, model: GPT, batch_size: int, context_shift: int | None = None, use_cache: bool = True):
        config = model.config
        self.model = model
        self.batch_size = batch_size
        self.block_size = config.block_size
        shift = min(context_shift or max(1, config.block_size // 4), config.block_size)
        self.keep = config.block_size + 1 - shift
        weight = model.lm_head.weight
        self.cache = KVCache(config, batch_size, weight.device, weight.dtype) if use_cache else None
        # the tokens the model currently sees, row by row: context[:, :length]
        self.context = torch.zeros(batch_size, config.block_size, dtype=torch.long, device=weight.device)
        self.length = 0
        self.refills = 0  # times the window slid
        self.reused = 0  # positions the last prefill kept from the cache

    def prefill(self, ids: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """Start over from ids (1 or B, T <= block_size); one row is shared by every row. With
        ``reuse`` (one row), the cached positions that hold the same tokens as the start of ids are
        kept and only the rest runs: a chat's next prompt extends the last one (``reused`` counts)."""
        rows, length = ids.shape
        keep = 0
        if reuse and self.cache is not None and rows == self.batch_size == 1:
            n = min(self.length, length - 1)  # at least one token runs: its logits are the answer
            same = self.context[0, :n] == ids[0, :n]
            keep = int(same.long().cumprod(0).sum())  # the length of the common prefix
        self.reused = keep
        self.length = 0  # until the forward is done (an interrupted one leaves nothing to reuse)
        self.context[:, :length] = ids
        if self.cache is None:
            logits = self.model(ids, last_only=True)[:, -1]  # (rows, vocab)
        else:
            self.cache.pos = keep
            logits = self.model(ids[:, keep:], kv_cache=self.cache, last_only=True)[:, -1]
            self.cache.pos = length
            if rows < self.batch_size:
                self.cache.fill_rows()
        self.length = length
        return logits.expand(self.batch_size, -1) if rows < self.batch_size else logits

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append next_ids (B,) to the context and return the logits that follow it."""
        if self.length == self.block_size:  # full: slide the window and re-fill
            self.refills += 1
            recent = self.context[:, self.length - self.keep + 1 : self.length]
            return self.prefill(torch.cat([recent, next_ids[:, None]], dim=1))
        self.context[:, self.length] = next_ids
        if self.cache is None:
            self.length += 1
            return self.model(self.context[:, : self.length], last_only=True)[:, -1]
        logits = self.model(next_ids[:, None], kv_cache=self.cache)[:, -1]
        self.cache.pos += 1
        self.length += 1  # after the forward: context[:, :length] is always what the cache holds
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.context = self.context.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


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


def choose_next(
    logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B,) from float32 logits (B, V): greedy at temperature 0, else a sample after
    temperature, top_k, top_p and min_p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
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
    # inverse-CDF sampling, one uniform draw per row: the same distribution as torch.multinomial,
    # ~10x faster over a 50k vocabulary on the CPU (where multinomial takes ~2 ms a row); float64
    # sums (MPS has none: float32), so that 50k small probabilities add up without drift
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(wide).cumsum(dim=-1)  # (B, V), not normalised
    u = torch.rand((probs.size(0), 1), generator=generator, device=probs.device, dtype=wide)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first token whose cdf exceeds u
    return index.squeeze(-1).clamp_(max=probs.size(-1) - 1)
