"""The decoding core: one preallocated KV cache whose rows have their own lengths, and the
``Decoder`` that runs the model over it (prefill, decode steps, context shifting).

A prompt is run through the model once (the prefill), which fills the cache; then each new token
costs one single-token forward over every row in use (a decode step). When prompt + output outgrow
``block_size``, the oldest ``context_shift`` tokens are dropped and the cache is re-filled from the
most recent context, so generation goes on for as long as asked, for learned and rotary positions
alike. Rows come and go (the server's continuous batching: ``add``, ``copy_row``, ``drop_row``) or
are reordered (beam search). Choosing the next token is ``gpt.infer.sampling``; streams of text,
stop strings and beam search are ``gpt.infer.generate``.

    decoder = Decoder(model, batch_size=4)
    logits = decoder.prefill(prompt)                 # (4, vocab) for the next position
    logits = decoder.step(next_ids)                  # next_ids (4,)
"""

from __future__ import annotations

import torch

from gpt.device import free_memory
from gpt.errors import ConfigError
from gpt.model import GPT, GPTConfig


class KVCache:
    """Preallocated keys and values, one (B, n_head, block_size, head_size) tensor each per layer,
    and ``lengths[row]``, the positions each row holds (nanochat's ``cache_seqlens``).

    A forward covers the rows ``[first, first + b)``: ``begin(first, b, T)`` prepares what the model
    reads (``gpt.model.KVStore``: the new tokens' positions and, only when the rows differ in length
    or T tokens follow cached ones, the attention mask), the model calls ``update`` for every layer,
    and ``advance`` records the new lengths. ``n_head`` is the cache's own: the number of key/value
    heads (``config.kv_heads``), which grouped-query attention makes smaller than the query heads'."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 n_head: int | None = None):  # fmt: skip
        self.n_head = n_head or config.kv_heads
        self.block_size = config.block_size
        shape = (batch_size, self.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.device = device
        self.lengths = [0] * batch_size  # Python ints: reading them never waits for the device
        self._arange = torch.arange(config.block_size, device=device)
        # the forward being run (set by begin)
        self.rows, self.T = slice(0, batch_size), 0
        self.start: int | None = 0  # the rows' common length; None when they differ
        self.end = 0  # keys each row attends over: the longest row + T
        self.positions = self._arange[:0].expand(batch_size, 0)  # (b, T)
        self.attn_mask: torch.Tensor | None = None

    def begin(self, first: int, b: int, T: int) -> None:
        """Prepare a forward of T new tokens in rows [first, first + b)."""
        lengths = self.lengths[first : first + b]
        shortest, longest = min(lengths), max(lengths)
        if longest + T > self.block_size:
            raise ValueError(f"sequence of {longest + T} tokens exceeds block_size={self.block_size}")
        self.rows, self.T, self.end = slice(first, first + b), T, longest + T
        if shortest == longest:  # the fast paths: positions are a view, no mask or a causal one
            self.start = shortest
            self.positions = self._arange[shortest : shortest + T].expand(b, T)
            self.attn_mask = None
            if shortest and T > 1:  # query i sees the cached keys and the new ones up to itself
                ones = torch.ones(T, self.end, dtype=torch.bool, device=self.device)
                self.attn_mask = ones.tril(diagonal=shortest)
            return
        self.start = None
        self.positions = torch.tensor(lengths, device=self.device)[:, None] + self._arange[:T]  # (b, T)
        # query t of a row sees the row's cached keys and the new ones up to itself: key j <= positions
        keys = self._arange[: self.end]
        self.attn_mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (b, 1, T, end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, nh, T, hs) at each row's positions; return the rows' (b, nh, end, hs)."""
        rows, ck, cv = self.rows, self.k[layer], self.v[layer]
        if self.start is not None:
            ck[rows, :, self.start : self.start + self.T] = k
            cv[rows, :, self.start : self.start + self.T] = v
        else:
            index = torch.arange(rows.start, rows.stop, device=self.device)[:, None]  # (b, 1) by (b, T)
            ck[index, :, self.positions] = k.transpose(1, 2)  # indexed as (b, T, nh, hs)
            cv[index, :, self.positions] = v.transpose(1, 2)
        return ck[rows, :, : self.end], cv[rows, :, : self.end]

    def advance(self, added: list[int] | None = None) -> None:
        """The forward's rows hold T more positions (or added[i] for its row i: right-padded prompts,
        whose padding lies beyond the row's length and is never attended)."""
        for i, row in enumerate(range(self.rows.start, self.rows.stop)):
            self.lengths[row] += self.T if added is None else added[i]

    def copy_rows(self, source: list[int], target: list[int], n: int) -> None:
        """Rows target[i] take the first n cached positions of rows source[i] (a prompt prefilled once
        and shared, the beams kept by beam search, the last row moved into a freed one); the caller
        copies their lengths."""
        src = torch.tensor(source, device=self.device)
        dst = torch.tensor(target, device=self.device)
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]  # the right side is gathered first: overlaps are safe


def check_memory(model: GPT, rows: int, key: str) -> None:
    """ConfigError naming ``key`` when ``rows`` decoded together cannot fit in free memory: each row
    holds its KV cache (2 x n_layer x block_size x kv_heads x head_size) and a few (vocab,) float32
    score rows."""
    config, weight = model.config, model.transformer.wte.weight  # activations' dtype (not int8's)
    kv_width = config.kv_heads * config.head_size
    per_row = 2 * config.n_layer * config.block_size * kv_width * weight.element_size()
    per_row += 8 * config.vocab_size * 4 + 8 * config.block_size
    free = free_memory(weight.device)
    if free is not None and rows * per_row > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ConfigError(
            f"{key}={rows} needs about {gib(rows * per_row)} for decoding, more than the {gib(free)} free "
            f"on {weight.device.type}; at most {max(1, free // per_row)} fit: lower {key}"
        )


def compile_decode(model: GPT) -> None:
    """Make every ``Decoder`` over ``model`` run its one-token decode steps through ``torch.compile``
    (prefills and multi-token forwards stay eager); inference only: the weights are frozen into the
    compiled code (inductor's freezing, which also packs them for oneDNN on the CPU), so a model whose
    weights change afterwards must not be compiled. Compiled once per model, at its first step
    (GPT-2 124M on a shared 2-core CPU: ~30 s for one row, ~70 s for several); the cache's length
    is a dynamic size, so the step is not recompiled as the context grows. CUDA graphs
    (``mode="reduce-overhead"``) are not used: the cache is written in place and its length changes
    every token. docs/benchmarks.md ("The batch-1 decode step") has the figures."""
    if "_compiled_step" not in model.__dict__:
        model.__dict__["_compiled_step"] = _CompiledStep(torch.compile(model, dynamic=True))  # no submodule


class _CompiledStep:
    """The compiled model, held outside the module tree; a deep copy of the model gets None (a copy
    has other weights: it compiles again only if asked)."""

    __slots__ = ("compiled",)

    def __init__(self, compiled: torch.nn.Module):
        self.compiled = compiled

    def __call__(self, ids: torch.Tensor, kv_cache: KVCache, last_only: bool) -> torch.Tensor:
        import torch._inductor.config as inductor
        import torch.fx.experimental._config as shapes

        # freezing for this model alone, around every call: a call may (re)compile. torch.compile's
        # options={"freezing": True} is not enough (measured: the weights stayed unpacked, 1.5x slower).
        # No duck sizing: a first step at length 16 with 16 rows would tie the two and recompile later
        with inductor.patch(freezing=True), shapes.patch(use_duck_shape=False):
            return self.compiled(ids, kv_cache=kv_cache, last_only=last_only)

    def __deepcopy__(self, memo: dict) -> None:
        return None


class Decoder:
    """Runs the model over rows of growing contexts, rows ``[0, rows)`` in use: ``prefill`` a prompt
    into every row (or ``add`` prompts as new rows), then ``step`` one token per row; both return the
    next-token logits (rows, vocab). With ``use_cache=False`` every step re-runs the whole context
    instead (the reference the cache is tested and benchmarked against; equal rows only).

    When the context is full (``block_size`` tokens) and a token arrives, the oldest tokens are
    dropped so that ``block_size + 1 - shift`` remain, and the window is re-filled from scratch:
    positions restart at 0, which learned position tables need. ``shift=1`` is an exact sliding
    window (a re-fill every token); the default, a quarter of the block, amortises re-fills. Rows
    of different lengths (the server's) are ended before they fill the context."""

    def __init__(self, model: GPT, batch_size: int, context_shift: int | None = None, use_cache: bool = True):
        config = model.config
        self.model = model
        self.batch_size = batch_size
        self.block_size = config.block_size
        shift = min(context_shift or max(1, config.block_size // 4), config.block_size)
        self.keep = config.block_size + 1 - shift
        weight = model.transformer.wte.weight  # the activations' dtype and device
        self.cache = KVCache(config, batch_size, weight.device, weight.dtype) if use_cache else None
        # the tokens the model sees, row by row: context[row, :lengths[row]] (the cache's own lengths)
        self.context = torch.zeros(batch_size, config.block_size, dtype=torch.long, device=weight.device)
        self.lengths = self.cache.lengths if self.cache is not None else [0] * batch_size
        self.rows = 0  # rows in use
        self.refills = 0  # times the window slid
        self.reused = 0  # positions the last prefill kept from the cache

    def prefill(self, ids: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """Start over from ids (1 or B, T <= block_size) in every row; one row is shared by every row.
        With ``reuse`` (one row), the cached positions that hold the same tokens as the start of ids
        are kept and only the rest runs: a chat's next prompt extends the last one (``reused``)."""
        rows, length = ids.shape
        keep = 0
        if reuse and self.cache is not None and rows == self.batch_size == 1:
            n = min(self.lengths[0], length - 1)  # at least one token runs: its logits are the answer
            same = self.context[0, :n] == ids[0, :n]
            keep = int(same.long().cumprod(0).sum())  # the length of the common prefix
        self.reused = keep
        self.rows = 0  # until the forward is done
        self.lengths[:rows] = [keep] * rows
        self.context[:rows, :length] = ids
        logits = self._forward(ids[:, keep:], 0, last_only=True)[:, -1]  # (rows, vocab)
        if rows < self.batch_size:
            self._copy([0] * (self.batch_size - 1), list(range(1, self.batch_size)))
        self.rows = self.batch_size
        return logits.expand(self.batch_size, -1) if rows < self.batch_size else logits

    def add(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Prefill right-padded prompts ids (b, T) of ``lengths`` as b new rows, in one forward (each
        row's padding lies beyond its length: never attended); the logits (b, vocab) after each."""
        first, (b, T) = self.rows, ids.shape
        if self.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.block_size}")
        self.lengths[first : first + b] = [0] * b
        self.context[first : first + b, :T] = ids
        same = len(set(lengths)) == 1  # no padding: the last position's logits alone
        logits = self._forward(ids, first, last_only=same, added=lengths)  # (b, 1 or T, vocab)
        self.rows += b
        if same:
            return logits[:, -1]
        return logits[torch.arange(b), torch.tensor(lengths, device=ids.device) - 1]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append next_ids (rows,) to the rows' contexts and return the logits that follow them."""
        n, lengths = self.rows, self.lengths[: self.rows]
        if lengths[0] == self.block_size:  # full: slide the window and re-fill (equal rows)
            self.refills += 1
            recent = self.context[:n, self.block_size - self.keep + 1 :]
            return self.prefill(torch.cat([recent, next_ids[:, None]], dim=1))
        if min(lengths) == max(lengths):
            self.context[:n, lengths[0]] = next_ids
        else:
            where = torch.tensor(lengths, device=next_ids.device)
            self.context[torch.arange(n, device=next_ids.device), where] = next_ids
        return self._forward(next_ids[:, None], 0)[:, -1]

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ids (rows, T) to rows of equal length in one forward (speculative decoding's check of
        drafted tokens); the logits (rows, T, V) after each. The caller keeps length + T <= block_size."""
        n, T = ids.shape
        length = self.lengths[0]
        self.context[:n, length : length + T] = ids
        return self._forward(ids, 0)

    def truncate(self, length: int) -> None:
        """Every row keeps only its first ``length`` positions (drafted tokens that were rejected): a
        length change, nothing is copied; the positions beyond are overwritten by the next forward."""
        self.lengths[: self.rows] = [min(length, n) for n in self.lengths[: self.rows]]

    def _forward(self, ids: torch.Tensor, first: int, last_only: bool = False,
                 added: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """Run ids (b, T) after the cached positions of rows [first, first + b); logits (b, T or 1, V)."""
        b, T = ids.shape
        if self.cache is None:  # the whole context again, for equal rows
            end = self.lengths[first] + T
            self.lengths[first : first + b] = [end] * b
            return self.model(self.context[first : first + b, :end], last_only=True)
        self.cache.begin(first, b, T)
        compiled = self.model.__dict__.get("_compiled_step") if T == 1 else None  # compile_decode
        model = compiled or self.model
        logits = model(ids, kv_cache=self.cache, last_only=last_only and T > 1)  # one guard fewer
        self.cache.advance(added)  # after the forward: context[row, :length] is what the cache holds
        return logits

    def copy_row(self, source: int) -> int:
        """Take the next free row as a copy of row ``source``; its index."""
        self._copy([source], [self.rows])
        self.rows += 1
        return self.rows - 1

    def drop_row(self, row: int) -> None:
        """Free ``row``: the last row in use moves into its place (callers renumber it)."""
        last = self.rows - 1
        if row != last:
            self._copy([last], [row])
        self.lengths[last] = 0
        self.rows -= 1

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search keeps the extensions of the best beams)."""
        self._copy(index.tolist(), list(range(index.numel())))

    def _copy(self, source: list[int], target: list[int]) -> None:
        self.context[target] = self.context[source]
        lengths = [self.lengths[s] for s in source]  # read all first: a permutation overlaps
        if self.cache is not None:
            self.cache.copy_rows(source, target, max(lengths))
        for row, length in zip(target, lengths, strict=True):
            self.lengths[row] = length
