"""Preparation shared between processes: the input cut into parts that the ranks tokenize, the
progress bar that reports for all of them, and the finished folder with the one val split (also
``gpt eval bpb``'s): the last ``data.val_fraction`` (or ``data.val_tokens``) of the corpus's tokens,
whatever the container (.txt, .jsonl, .gz, .zst, Parquet), after the ``data.max_tokens`` cut.

    parts = plan_parts(input_units(files), PART_BYTES)   # the same list whatever the world size
    # rank r (of a gpt.ranks.Ranks) tokenizes parts r, r + N, ...; the ranks agree on the totals
    finish(cfg, src, files, tok, tmp, n_parts, ShardWriter(tmp, "val", ...))   # rank 0: the token cuts

A part is a run of consecutive units (files, Parquet row groups) of about ``PART_BYTES`` input bytes;
each part becomes its own shards, so the shard set depends on the input alone, never on how many
processes prepared it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.atomic import atomic_write
from gpt.config import DataConfig
from gpt.data.corpus import Unit
from gpt.data.shards import HEADER_BYTES, VERSION, read_shard, shard_header
from gpt.tokenizer import Tokenizer

# input bytes per part: small enough that a few hundred MB keep several processes busy, large enough
# that a 1 TB corpus stays at ~31k shards (each is memory-mapped; Linux allows 65k maps per process)
PART_BYTES = 32 << 20
COPY_TOKENS = 1 << 24  # tokens moved at a time when the val split is cut out of train shards


@dataclass
class Part:
    index: int
    units: list[tuple[int, Unit]]  # (byte offset of the unit in the whole input, unit)
    nbytes: int


def plan_parts(units: list[Unit], part_bytes: int = PART_BYTES) -> list[Part]:
    """Consecutive units grouped into parts of at least ``part_bytes`` (the last one: the rest)."""
    parts: list[Part] = []
    group: list[tuple[int, Unit]] = []
    pos = size = 0
    for unit in units:
        group.append((pos, unit))
        pos, size = pos + unit.nbytes, size + unit.nbytes
        if size >= part_bytes:
            parts.append(Part(len(parts), group, size))
            group, size = [], 0
    if group:
        parts.append(Part(len(parts), group, size))
    return parts


class Progress:
    """The bar on rank 0: input bytes (with their rate and the ETA), tokens and tokens/s, for all ranks
    (this rank's own work as it goes, everyone's at the end of each round of parts)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled)
        self.tokens, self.t0 = 0, time.perf_counter()

    def _postfix(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def update(self, nbytes: int, ntokens: int) -> None:
        self.tokens += ntokens
        self._postfix()
        self.bar.update(nbytes)

    def set(self, nbytes: int, ntokens: int) -> None:
        self.tokens, self.bar.n = ntokens, nbytes
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _truncate(path: Path, n: int) -> None:
    """Keep the first ``n`` tokens of a shard (its header rewritten with the new count)."""
    h = np.fromfile(path, dtype="<i4", count=4)  # header: magic, version, bytes per token, vocab_size
    itemsize, vocab_size = int(h[2]), int(h[3])
    with open(path, "r+b") as f:
        f.write(shard_header(n, np.dtype(f"<u{itemsize}"), vocab_size))
        f.truncate(HEADER_BYTES + n * itemsize)


def cut_tokens(directory: Path, shards: list[tuple[str, int]], keep: int, val_start: int, val_writer
               ) -> list[str]:  # fmt: skip
    """Apply the token cuts to ``shards`` ((name, tokens) in order, in ``directory``): tokens
    [val_start, keep) go to ``val_writer`` (``.add(tokens)``), tokens from ``keep`` on are dropped.
    Returns the names of the shards that still hold train tokens."""
    train, pos = [], 0
    for name, n in shards:
        path, lo = directory / name, pos
        pos += n
        v_lo, v_hi = max(lo, val_start) - lo, min(pos, keep) - lo  # this shard's val tokens
        for a in range(v_lo, v_hi, COPY_TOKENS):
            val_writer.add(np.array(read_shard(path)[a : min(a + COPY_TOKENS, v_hi)]))
        n_train = max(0, min(pos, val_start) - lo)
        if n_train == 0:
            path.unlink()
            continue
        if n_train < n:
            _truncate(path, n_train)
        train.append(name)
    return train


def finish(cfg: DataConfig, src: Path, files: list[Path], tok: Tokenizer, tmp: Path, n_parts: int,
           writer: Any) -> None:  # fmt: skip
    """Rank 0, once every part is written: the token cuts (the first ``max_tokens`` tokens, the last
    ``val_tokens`` or ``val_fraction`` of them val, moved to ``writer``, an empty shard writer for
    val_*.bin), the final shard names, then meta.json, which marks the folder complete."""
    metas = [json.loads((tmp / f"part{i:06d}.json").read_text()) for i in range(n_parts)]
    train = [(name, n) for m in metas for name, n in m["train"]]
    total = sum(n for _, n in train)
    keep = min(total, cfg.max_tokens) if cfg.max_tokens else total
    n_val = min(cfg.val_tokens or round(cfg.val_fraction * keep), keep)
    try:
        kept = cut_tokens(tmp, train, keep, keep - n_val, writer)
    finally:
        writer.close()
    train_names, val_names = [], writer.names
    for i, name in enumerate(kept):
        train_names.append(f"train_{i:06d}.bin")
        os.rename(tmp / name, tmp / train_names[-1])
    train_tokens, val_tokens = keep - n_val, writer.total
    for i in range(n_parts):
        (tmp / f"part{i:06d}.json").unlink()
    for leftover in tmp.glob("part*.bin"):  # parts past max_tokens
        leftover.unlink()
    meta = {"format_version": VERSION, "name": cfg.name, "source": str(src), "files": [str(f) for f in files],
            "tokenizer": tok.kind, "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
            "train_tokens": train_tokens, "val_tokens": val_tokens, "train_shards": train_names,
            "val_shards": val_names, "max_tokens": cfg.max_tokens,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))  # written last: marks it complete
