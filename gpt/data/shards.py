"""Token shards: the on-disk format of prepared data, and the random training windows read from it.

A shard is a 1024-byte header of 256 little-endian int32 and then the tokens:
header[0] = MAGIC ("GTKN"), [1] = VERSION, [2] = bytes per token (2: uint16, 4: uint32),
[3] = vocab_size, [4:6] = the token count as one little-endian int64. Shards are memory-mapped.

    write_shard("train_000.bin", tokens, vocab_size)
    train = TokenWindows(shard_paths, block_size=256, seed=1337)
    x, y = train.get(step, batch_size=64, start=0, count=16)   # (16, 256) int64 each, y = x shifted
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt.atomic import atomic_write
from gpt.errors import DataError

if TYPE_CHECKING:  # torch is imported lazily: tokenizer worker processes start faster without it
    import torch

MAGIC = 0x4E4B5447  # the bytes b"GTKN" read as a little-endian int32
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
REDO = "delete the cache folder and re-run the data preparation (gpt prepare PATH)"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_header(n_tokens: int, dtype: np.dtype, vocab_size: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[2], h[3] = MAGIC, VERSION, dtype.itemsize, vocab_size
    h[4:6] = np.array([n_tokens], dtype="<i8").view("<i4")  # the count as one int64 at byte 16
    return h.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write ``tokens`` (1-D) as a shard, atomically: a crash never leaves a partial file at ``path``."""
    dtype = token_dtype(vocab_size)

    def write(f) -> None:
        f.write(shard_header(len(tokens), dtype, vocab_size))
        f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())

    atomic_write(path, write)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map, after checking its header and size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        h = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read token shard {path}: {e.strerror}; {REDO}") from None
    bad = None
    if size < HEADER_BYTES:
        bad = f"truncated header ({size} bytes)"
    elif int(h[0]) != MAGIC:
        bad = "bad magic number, not a token shard"
    elif int(h[1]) != VERSION:
        bad = f"format version {int(h[1])}, this code reads version {VERSION}"
    elif int(h[2]) not in (2, 4):
        bad = f"bad token size {int(h[2])} (expected 2 or 4)"
    if bad is None:
        n, itemsize = int(h[4:6].view("<i8")[0]), int(h[2])
        if n < 0 or size != HEADER_BYTES + n * itemsize:
            bad = f"{size} bytes but the header promises {n} tokens ({HEADER_BYTES + n * itemsize} bytes)"
    if bad is not None:
        raise DataError(f"corrupt token shard {path}: {bad}; {REDO}")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if n == 0:  # an empty file region cannot be memory-mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


class TokenWindows:
    """Random (block_size + 1)-token windows from shards, a pure function of (seed, step, position).

    Window ids number every valid start of every shard (a window never crosses a shard end); step
    ``s`` draws its global batch of ids from an RNG seeded by ``(seed, s)`` alone, so any split of
    the batch over processes and micro-steps sees the same windows, and a resumed run replays them."""

    def __init__(self, shards: list[Path], block_size: int, seed: int) -> None:
        self.block_size, self.seed = block_size, seed
        self.shards = [read_shard(p) for p in shards]
        # shard i holds len - block_size starts: window i's x = t[o:o+T], y = t[o+1:o+T+1]
        self._counts = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(self._counts)  # window ids [ends[i] - counts[i], ends[i]) are shard i's
        self.n_windows = int(self._ends[-1]) if len(self._ends) else 0
        if self.n_windows == 0:
            sizes = [len(s) for s in self.shards]
            raise DataError(
                f"no shard holds a window of block_size + 1 = {block_size + 1} tokens (shard sizes "
                f"{sizes}); use a smaller model.block_size or more text"
            )

    def window_starts(self, step: int, batch_size: int) -> np.ndarray:
        """The global batch's window ids for ``step``: shape (batch_size,), uniform, with replacement."""
        rng = np.random.default_rng([self.seed % (1 << 63), step])  # SeedSequence needs ints >= 0
        return rng.integers(0, self.n_windows, size=batch_size, dtype=np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, token offset in that shard) of each window id."""
        shard = np.searchsorted(self._ends, ids, side="right")
        return shard, ids - (self._ends[shard] - self._counts[shard])

    def get(self, step: int, batch_size: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors (count, block_size) for global-batch positions [start, start+count)."""
        import torch

        if not (start >= 0 and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        ids = self.window_starts(step, batch_size)[start : start + count]
        buf = np.empty((count, self.block_size + 1), dtype=np.int64)  # (count, T+1): x and y together
        for row, (s, o) in enumerate(zip(*self.locate(ids), strict=True)):
            buf[row] = self.shards[s][o : o + self.block_size + 1]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
