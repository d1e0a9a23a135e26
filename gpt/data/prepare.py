"""Data preparation: tokenize the user's text (read by ``gpt.data.corpus``) once into cached token
shards (``gpt.data.shards``), streamed and in parallel.

    python -m gpt.data data/tinyshakespeare/input.txt tokenizer=char   # prepare ahead of time

    from gpt.data.prepare import prepare
    data = prepare(cfg.data, block_size=256)             # cached under data/cache/<name>-<key>/
    train = TokenWindows(data.train_shards, 256, seed=1337)

Input is a file, a directory (its .txt and .jsonl files, recursively) or a glob: a .txt file is one
document, a .jsonl line is one document (``obj[jsonl_field]``). Every document is followed by the
tokenizer's end-of-text id. The last ``val_fraction`` of the input bytes (cut at a line start) is the
val split. The cache folder is keyed by the inputs and the tokenizer, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.config import DataConfig, resolve_path
from gpt.data.corpus import CHUNK_BYTES, input_files, iter_documents, iter_pieces
from gpt.data.shards import HEADER_BYTES, REDO, VERSION, read_shard, shard_header, token_dtype
from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError
from gpt.tokenizer import Tokenizer, load_tokenizer

PARALLEL_MIN_BYTES = 4 << 20  # smaller inputs are tokenized in-process (no worker start-up cost)


class _ShardWriter:
    """Streams token arrays into ``<prefix>_000000.bin, ...`` of at most ``shard_tokens`` tokens each;
    memory use is one incoming array, whatever the corpus size."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int, vocab_size: int) -> None:
        self.directory, self.prefix, self.limit = directory, prefix, max(1, shard_tokens)
        self.vocab_size, self.dtype = vocab_size, token_dtype(vocab_size)
        self.names: list[str] = []
        self.total, self._n, self._f = 0, 0, None

    def add(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None:
                self.names.append(f"{self.prefix}_{len(self.names):06d}.bin")
                self._f = open(self.directory / self.names[-1], "wb")
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
            self._f, self._n = None, 0


# ----------------------------------------------------------------------------------- preparation
@dataclass
class PreparedData:
    directory: Path
    tokenizer: Tokenizer
    train_shards: list[Path] = field(default_factory=list)
    val_shards: list[Path] = field(default_factory=list)  # empty when val_fraction == 0
    train_tokens: int = 0
    val_tokens: int = 0

    @property
    def has_val(self) -> bool:
        return bool(self.val_shards)


def load_prepared(directory: str | Path, tokenizer: Tokenizer | None = None) -> PreparedData:
    """A prepared cache folder (its meta.json, shards and tokenizer.json; ``tokenizer`` overrides)."""
    d = Path(directory)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{d} is not a complete prepared-data folder ({e}); {REDO}") from None
    shards = {s: [d / n for n in meta[f"{s}_shards"]] for s in ("train", "val")}
    missing = [p for ps in shards.values() for p in ps if not p.is_file()]
    if missing:
        raise DataError(f"token shard {missing[0]} is missing; {REDO}")
    tok = tokenizer if tokenizer is not None else load_tokenizer(d / "tokenizer.json")
    return PreparedData(d, tok, shards["train"], shards["val"], meta["train_tokens"], meta["val_tokens"])


def _tasks(cfg: DataConfig, src: Path, total: int) -> Iterator[tuple[str, list[tuple[str, bool]], int]]:
    """Group the pieces into ``(split, [(text, ends_document), ...], source_bytes)`` tasks of about a
    chunk each. Val starts at the first line start at or after byte ``(1 - val_fraction) * total``."""
    boundary = int(total * (1 - cfg.val_fraction)) if cfg.val_fraction > 0 else None
    pos, split, items, nbytes = 0, "train", [], 0
    for piece in iter_pieces(src, cfg.jsonl_field):
        parts = [(piece.text, piece.doc_end)]
        if split == "train" and boundary is not None and pos + piece.nbytes > boundary:
            k = max(boundary - pos, 0)  # the boundary's byte offset in this piece
            raw = piece.text.encode("utf-8") if piece.splittable and k > 0 else b""
            cut = raw.find(b"\n", k - 1) + 1 if raw else 0  # the first line start >= k (0: none)
            if k == 0 or 0 < cut < len(raw):  # else: the next piece starts val (at a line start)
                if cut:  # the document goes on in val: no eot after its train part
                    items.append((raw[:cut].decode("utf-8"), False))
                    parts = [(raw[cut:].decode("utf-8"), piece.doc_end)]
                if items:
                    yield split, items, nbytes
                    items, nbytes = [], 0
                split = "val"
        pos += piece.nbytes
        items += parts
        nbytes += piece.nbytes
        if nbytes >= CHUNK_BYTES:
            yield split, items, nbytes
            items, nbytes = [], 0
    if items:
        yield split, items, nbytes


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    # a forked worker inherits the trainer's handlers: Ctrl-C (sent to the whole process group) is
    # the parent's to act on, and the parent's pool.terminate() (SIGTERM) must end the worker at once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


def _write(
    writers: dict[str, _ShardWriter], bar: tqdm, watch: Any, split: str, result: Any, nbytes: int
) -> None:
    writers[split].add(result if isinstance(result, np.ndarray) else _wait(result, *watch))
    bar.update(nbytes)


def _tokenize(
    cfg: DataConfig, src: Path, total: int, tok: Tokenizer, out: Path, show_progress: bool
) -> tuple[_ShardWriter, _ShardWriter]:
    """Tokenize the input into train_*.bin and val_*.bin in `out`, in worker processes for big inputs."""
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens, tok.vocab_size) for s in ("train", "val")}
    workers = min(cfg.num_workers or os.cpu_count() or 1, -(-total // CHUNK_BYTES))  # <= one per task
    if total < PARALLEL_MIN_BYTES:
        workers = 1
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress)
    pool = None
    try:
        if workers > 1:
            # fork: workers start at once, share the tokenizer and do not re-run the main script (as
            # PyTorch's DataLoader, they only compute, never touch CUDA); elsewhere spawn, which
            # pickles the tokenizer through its state
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = ctx.Pool(workers, _init_worker, (tok,))
        watch = (pool, {p.pid for p in pool._pool}) if pool is not None else None
        pending: deque = deque()  # (split, result, bytes) in order; at most 2 tasks per worker in flight
        for split, items, nbytes in _tasks(cfg, src, total):
            if pool is None:
                pending.append((split, _encode(items, tok), nbytes))
            else:
                pending.append((split, pool.apply_async(_encode, (items,)), nbytes))
            while pending and (pool is None or len(pending) > 2 * workers or pending[0][1].ready()):
                _write(writers, bar, watch, *pending.popleft())
        while pending:
            _write(writers, bar, watch, *pending.popleft())
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.close()
    return writers["train"], writers["val"]


FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 64, 1 << 20  # larger ones: evenly spread samples (and the size)


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes: all of them up to FULL_HASH_BYTES, else SAMPLES spread samples, so
    that an edit keeping the size and mtime still changes the key (and a touch does not)."""
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale_temp(cache: Path) -> None:
    """Remove the temp folders (``.tmp-NAME-HOST-PID``) of preparations killed on this host: their
    process is gone. Another host's, or a live process's, are left alone (a shared cache)."""
    for tmp in cache.glob(".tmp-*") if cache.is_dir() else []:
        rest, _, pid = tmp.name.rpartition("-")
        host = rest.rpartition("-")[2]
        if host != _HOST or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def check_token_ids(data: PreparedData, full_check_tokens: int = 1 << 28) -> str | None:
    """What is wrong with the shards' token ids for ``data.tokenizer`` (None: nothing): a header
    vocabulary other than the tokenizer's, or an id outside it. Every token is read up to
    ``full_check_tokens`` in all; beyond, the first and last million of each shard."""
    vocab = data.tokenizer.vocab_size
    full = data.train_tokens + data.val_tokens <= full_check_tokens
    for path in [*data.train_shards, *data.val_shards]:
        tokens = read_shard(path)
        header_vocab = int(np.fromfile(path, dtype="<i4", count=4)[3])
        if header_vocab != vocab:
            return f"{path.name} was written for a vocabulary of {header_vocab}, the tokenizer has {vocab}"
        parts = [tokens] if full or len(tokens) <= 2_000_000 else [tokens[:1_000_000], tokens[-1_000_000:]]
        top = max((int(p.max()) for p in parts if len(p)), default=-1)
        if top >= vocab:
            return f"{path.name} holds token id {top}, outside the tokenizer's {vocab} ids"
    return None


def cache_key(cfg: DataConfig, files: list[Path], tokenizer_id: Any) -> str:
    """Hash of everything the shards depend on: the input files (name, size, content), the split,
    the shard size and the tokenizer."""
    stats = [(str(f.resolve()), f.stat().st_size, content_digest(f)) for f in files]
    spec = [VERSION, stats, cfg.jsonl_field, cfg.val_fraction, cfg.shard_tokens, tokenizer_id]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def prepare(
    cfg: DataConfig, block_size: int, tokenizer: Tokenizer | None = None, show_progress: bool = True
) -> PreparedData:
    """Tokenize ``cfg.path`` into cached shards (or reuse them) and check they hold full windows.

    ``tokenizer`` (fine-tuning reuses the model's) is used as is; without one it is built from
    ``cfg`` (char and bpe from the corpus itself)."""
    src, cache = resolve_path(cfg.path), resolve_path(cfg.cache_dir)
    files = input_files(src)
    built_from_corpus = cfg.tokenizer in ("char", "bpe")
    if tokenizer is None and not built_from_corpus:
        tokenizer = build_tokenizer(cfg.tokenizer, lambda: (), cfg.vocab_size, cfg.tokenizer_path)
    # a char/bpe tokenizer is not known before it is built from the corpus: key by its recipe instead
    recipe = [cfg.tokenizer] + ([cfg.vocab_size, cfg.bpe_train_bytes] if cfg.tokenizer == "bpe" else [])
    keys = [cache_key(cfg, files, tokenizer.fingerprint() if tokenizer else recipe)]
    if tokenizer is not None and built_from_corpus:  # resuming: the folder that built this tokenizer
        keys.append(cache_key(cfg, files, recipe))
    fingerprint = tokenizer.fingerprint() if tokenizer else None
    _remove_stale_temp(cache)
    found = _find_cached(cache, cfg.name, keys, fingerprint)
    data = None
    if found is not None:
        try:
            data = load_prepared(found, tokenizer)
            problem = check_token_ids(data)
        except DataError as e:
            problem = str(e)
        if problem:  # a damaged or poisoned entry: set it aside and build it again
            print(
                f"notice: the prepared data in {found} is bad ({problem[:200]}); rebuilding it",
                file=sys.stderr,
            )
            aside = found.with_name(f".tmp-bad-{found.name}-{_HOST}-{os.getpid()}")
            os.replace(found, aside)
            shutil.rmtree(aside, ignore_errors=True)
            data = None
    if data is None:
        data = _build(cfg, src, files, tokenizer, cache / f"{cfg.name}-{keys[0]}", show_progress)
    need = block_size + 1
    if data.train_tokens < need or (cfg.val_fraction > 0 and data.val_tokens < need):
        raise DataError(
            f"{cfg.path}: {data.train_tokens} train and {data.val_tokens} val tokens, but one window "
            f"needs block_size + 1 = {need}; use a smaller model.block_size, a smaller "
            f"data.val_fraction, or more text"
        )
    return data


def _find_cached(cache: Path, name: str, keys: list[str], fingerprint: str | None) -> Path | None:
    """A complete folder for one of ``keys`` (any name: it may have been prepared ahead of time),
    holding the tokenizer with ``fingerprint`` when one is given."""
    for key in keys:
        for d in [cache / f"{name}-{key}", *sorted(cache.glob(f"*-{key}"))]:
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue  # not complete
            if fingerprint is None or meta.get("tokenizer_fingerprint") == fingerprint:
                return d
    return None


def _build(
    cfg: DataConfig, src: Path, files: list[Path], tok: Tokenizer | None, target: Path, show_progress: bool
) -> PreparedData:
    """Prepare into a temp folder, then rename it into place: a half-built folder never looks complete."""
    if tok is None:
        texts = lambda: iter_documents(src, cfg.jsonl_field)  # build_tokenizer stops at bpe_train_bytes
        tok = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path, cfg.bpe_train_bytes)
    tmp = target.with_name(f".tmp-{target.name}-{_HOST}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = sum(f.stat().st_size for f in files)
        train, val = _tokenize(cfg, src, total, tok, tmp, show_progress)
        tok.save(tmp)
        meta = {
            "format_version": VERSION,
            "name": cfg.name,
            "source": str(src),
            "files": [str(f) for f in files],
            "tokenizer": tok.kind,
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "train_tokens": train.total,
            "val_tokens": val.total,
            "train_shards": train.names,
            "val_shards": val.names,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks it complete
        if target.exists() and not (target / "meta.json").is_file():
            shutil.rmtree(target)  # the leftover of an interrupted run
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():
                raise
            # another process finished the same folder first: theirs is identical, use it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(target, tok)


# --------------------------------------------------------------------------------------- batches
