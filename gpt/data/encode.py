"""Tokenization of the planned input parts (``gpt.data.parts``) into token shards: each part's
text, cut into chunk-sized tasks, is encoded in a pool of worker processes (in-process for small
inputs) and streamed into ``part<index>-train_*.bin`` shards (``gpt.data.shards``'
format) with a ``part<index>.json`` list. ``gpt.data.prepare`` decides what to tokenize and where
the result is cached; this module only does the work, rank by rank.

    from gpt.data.encode import tokenize_parts
    n_parts = tokenize_parts(cfg, parts, tokenizer, out_dir, ranks, show_progress=True)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from multiprocessing import connection
from pathlib import Path
from typing import Any

import numpy as np

from gpt.atomic import atomic_write
from gpt.config import DataConfig
from gpt.data.corpus import CHUNK_BYTES, unit_pieces
from gpt.data.parts import Part, Progress
from gpt.data.shards import HEADER_BYTES, shard_header, token_dtype
from gpt.errors import DataError, UserError
from gpt.ranks import Ranks
from gpt.tokenizer import Tokenizer

PARALLEL_MIN_BYTES = 4 << 20  # smaller inputs are tokenized in-process (no worker start-up cost)


class ShardWriter:
    """Streams token arrays into ``<prefix>_000000.bin, ...`` of at most ``shard_tokens`` tokens each;
    memory use is one incoming array, whatever the corpus size."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int, vocab_size: int) -> None:
        self.directory, self.prefix, self.limit = directory, prefix, max(1, shard_tokens)
        self.vocab_size, self.dtype = vocab_size, token_dtype(vocab_size)
        self.names: list[str] = []
        self.counts: list[int] = []  # tokens of each closed shard
        self.total, self._n, self._f = 0, 0, None

    def add(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None:
                self.names.append(f"{self.prefix}_{len(self.names):06d}.bin")
                # open across add() calls (closed in _next_file/close): no with-block can hold it
                self._f = open(self.directory / self.names[-1], "wb")  # noqa: SIM115
                self._f.write(bytes(HEADER_BYTES))  # placeholder, rewritten with the count on close
            take = tokens[: self.limit - self._n]
            self._f.write(take.tobytes())
            self._n += len(take)
            self.total += len(take)
            tokens = tokens[len(take) :]
            if self._n == self.limit:
                self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.seek(0)
            self._f.write(shard_header(self._n, self.dtype, self.vocab_size))
            self._f.close()
            self.counts.append(self._n)
            self._f, self._n = None, 0


def _tasks(cfg: DataConfig, part: Part) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """Group the part's pieces into ``([(text, ends_document), ...], source_bytes)`` tasks of about
    a chunk each (the val split is cut from the tokens afterwards: ``gpt.data.parts.finish``)."""
    items, nbytes = [], 0
    for _, unit in part.units:
        for piece in unit_pieces(unit, cfg.text_field):
            items.append((piece.text, piece.doc_end))
            nbytes += piece.nbytes
            if nbytes >= CHUNK_BYTES:
                yield items, nbytes
                items, nbytes = [], 0
    if items:
        yield items, nbytes


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    # a forked worker inherits the trainer's handlers: Ctrl-C (sent to the whole process group) is
    # the parent's to act on, and SIGTERM (the parent's pool.terminate(), or the group's) ends the
    # worker at once, but by unwinding: a worker killed outright while it holds the result queue's
    # lock would leave pool.terminate() in the parent waiting for that lock forever
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_worker)
    signal.signal(signal.SIGALRM, _exit_worker)  # the deferred SIGTERM's second look, see below


def _exit_worker(signum: int, frame: Any) -> None:
    """End the worker between pipe messages: one that exits halfway through writing its result (or
    reading a task) leaves half a message in the pipe, and the parent's result thread, which
    pool.terminate() joins, would wait for the rest forever. Inside a pipe read or write the exit
    waits: another look every 10 ms (SIGALRM)."""
    while frame is not None:
        if frame.f_code.co_filename == connection.__file__:
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        frame = frame.f_back
    raise SystemExit(128 + signal.SIGTERM)


def _wait(result: Any, pool: Any, pids: set[int]) -> np.ndarray:
    """A worker's result; DataError if a worker died meanwhile (its task would never complete: the
    pool replaces the process, not the task)."""
    while not result.ready():
        result.wait(0.2)
        if {p.pid for p in pool._pool} != pids:  # Pool keeps its processes in _pool
            raise DataError(
                "a tokenizer worker process died (killed, or out of memory?); run the preparation again, "
                "with a smaller data.num_workers if memory is short"
            )
    return result.get()


def _encode(items: list[tuple[str, bool]], tokenizer: Tokenizer | None = None) -> np.ndarray:
    """Token ids of the pieces, with eot after each piece that ends a document: shape (n_tokens,)."""
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    eot = np.array([tok.eot_id], dtype=np.int64)
    out = []
    for (_, end), ids in zip(items, tok.encode_batch([t for t, _ in items]), strict=True):
        out.append(np.asarray(ids, dtype=np.int64))
        if end:
            out.append(eot)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _write(writer: ShardWriter, progress: Progress, watch: Any, result: Any, nbytes: int) -> None:
    tokens = result if isinstance(result, np.ndarray) else _wait(result, *watch)
    writer.add(tokens)
    progress.update(nbytes, len(tokens))


def _tokenize_part(
    cfg: DataConfig, part: Part, tok: Tokenizer, out: Path, pool: Any, workers: int, progress: Progress,
    budget: int, watch: Any = None,
) -> dict[str, list[tuple[str, int]]]:  # fmt: skip
    """Tokenize one part into ``part<index>-train_*.bin`` in ``out`` (in the worker ``pool`` when
    there is one), stopping once ``budget`` tokens are written (0: no limit); returns its shards as
    ``{"train": [(name, tokens), ...]}``, also written to ``part<index>.json``."""
    prefix = f"part{part.index:06d}"
    writer = ShardWriter(out, f"{prefix}-train", cfg.shard_tokens, tok.vocab_size)
    try:
        pending: deque = deque()  # (result, bytes) in order; at most 2 tasks per worker in flight
        for items, nbytes in _tasks(cfg, part):
            if pool is None:
                pending.append((_encode(items, tok), nbytes))
            else:
                pending.append((pool.apply_async(_encode, (items,)), nbytes))
            while pending and (pool is None or len(pending) > 2 * workers or pending[0][0].ready()):
                _write(writer, progress, watch, *pending.popleft())
            if budget and writer.total >= budget:
                break  # the rest of the part lies past data.max_tokens
        while pending:
            _write(writer, progress, watch, *pending.popleft())
    finally:
        writer.close()
    shards = {"train": list(zip(writer.names, writer.counts, strict=True))}
    atomic_write(out / f"{prefix}.json", json.dumps(shards))
    return shards


def tokenize_parts(
    cfg: DataConfig, parts: list[Part], tok: Tokenizer, out: Path, ranks: Ranks, show_progress: bool,
) -> int:  # fmt: skip
    """Tokenize the parts into ``out``: rank r takes parts r, r + N, ... in rounds of N parts (after each,
    the ranks add up their tokens: with ``max_tokens``, the rounds stop once there are enough).
    Returns how many parts were tokenized (the first ones)."""
    total, largest = sum(p.nbytes for p in parts), max(p.nbytes for p in parts)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ranks.world_size > 1 else 1
    workers = cfg.num_workers or max(1, (os.cpu_count() or 1) // per_node)  # the node's cores, shared
    workers = min(workers, -(-largest // CHUNK_BYTES))  # <= one per task
    if total < PARALLEL_MIN_BYTES:
        workers = 1
    progress = Progress(total, show_progress and ranks.is_main)
    pool, done_tokens, done_bytes = None, 0, 0
    try:
        if workers > 1:
            # fork: workers start at once, share the tokenizer and do not re-run the main script (as
            # PyTorch's DataLoader, they only compute, never touch CUDA); elsewhere spawn, which
            # pickles the tokenizer through its state
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = ctx.Pool(workers, _init_worker, (tok,))
        # the worker processes as started: one that dies is noticed instead of waited for
        watch = (pool, {p.pid for p in pool._pool}) if pool is not None else None
        for first in range(0, len(parts), ranks.world_size):
            mine, error, counts = first + ranks.rank, None, [0, 0]
            if mine < len(parts):
                budget = cfg.max_tokens - done_tokens if cfg.max_tokens else 0
                try:
                    shards = _tokenize_part(cfg, parts[mine], tok, out, pool, workers, progress, budget,
                                            watch)  # fmt: skip
                    counts = [sum(n for ss in shards.values() for _, n in ss), parts[mine].nbytes]
                except UserError as e:  # a corrupt file: every rank stops, the folder is removed
                    error = e
            ranks.agree(error)
            tokens, nbytes = ranks.sum(counts)
            done_tokens, done_bytes = done_tokens + tokens, done_bytes + nbytes
            progress.set(done_bytes, done_tokens)
            if cfg.max_tokens and done_tokens >= cfg.max_tokens:
                return min(first + ranks.world_size, len(parts))
        return len(parts)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
