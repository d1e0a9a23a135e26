"""Data preparation: tokenize the user's text (read by ``gpt.data.corpus``) once into cached token
shards (``gpt.data.shards``), streamed, in parallel, and shared out between the ranks of a job.

    gpt prepare data/tinyshakespeare/input.txt data.tokenizer=char   # prepare ahead of time
    torchrun --nproc_per_node=8 -m gpt prepare fineweb/ data.tokenizer=gpt2  # 8 processes share the work

    from gpt.data.prepare import prepare
    data = prepare(cfg.data, block_size=256)             # cached under data/cache/<name>-<key>/
    train = TokenWindows(data.train_shards, 256, seed=1337)

Input is a file, a directory (its .txt, .jsonl, .gz/.zst of those and .parquet files, recursively) or
a glob: a .txt file is one document, a .jsonl line or a Parquet row is one document (its
``text_field``). Every document is followed by the tokenizer's end-of-text id. The val split is
the last ``val_fraction`` (or ``val_tokens``) of the corpus's tokens, after the ``max_tokens`` cut,
the same for every container (``gpt.data.parts.finish``; ``gpt eval bpb data.split=val`` reads it).
The input is cut into parts (``gpt.data.parts``) that the ranks of a ``torchrun`` job
tokenize side by side (``gpt.data.encode``), each into its own shards: the result is the same
whatever the number of processes. The cache folder is keyed by the inputs and the tokenizer, so a
second run starts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt.config import DataConfig
from gpt.data.corpus import input_files, input_units, iter_documents, no_text
from gpt.data.encode import ShardWriter, tokenize_parts
from gpt.data.parts import PART_BYTES, finish, plan_parts
from gpt.data.shards import REDO, VERSION, read_shard
from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError, UserError
from gpt.ranks import Ranks
from gpt.tokenizer import NEW_SPECIALS, Tokenizer
from gpt.tokenizer_load import load_tokenizer
from gpt.typed_config import resolve_path


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


_HOST_CRC = zlib.crc32(socket.gethostname().encode())  # this host in temp folder names (no "-" in it)
_HOST = f"h{_HOST_CRC:08x}"


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


def file_stamps(files: list[Path]) -> list[tuple[int, int, int]]:
    """(size, mtime in ns, inode) of each file: taken before the key's content hash and again before
    the folder is committed, so that a file written meanwhile never leaves tokens the key does not
    describe (the hash alone is of the bytes before the change)."""
    return [(st.st_size, st.st_mtime_ns, st.st_ino) for st in (f.stat() for f in files)]


def _changed(files: list[Path], stamps: list[tuple[int, int, int]]) -> DataError | None:
    for f, before in zip(files, stamps, strict=True):
        try:
            now = file_stamps([f])[0]
        except OSError:
            now = None
        if now != before:
            return DataError(f"{f} changed while it was being prepared (nothing was cached); prepare it "
                             "again once nothing writes to it")  # fmt: skip
    return None


def cache_key(cfg: DataConfig, files: list[Path], tokenizer_id: Any) -> str:
    """Hash of everything the shards depend on: the input files (name, size, content), the split,
    the shard size, the token cuts and the tokenizer."""
    stats = [(str(f.resolve()), f.stat().st_size, content_digest(f)) for f in files]
    # "val-by-tokens": folders of the earlier byte-fraction split must not be served as this one
    spec = [VERSION, "val-by-tokens", stats, cfg.text_field, cfg.val_fraction, cfg.shard_tokens, tokenizer_id]
    spec += [cfg.max_tokens, cfg.val_tokens, PART_BYTES]  # the cuts, and where the shards break
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def summary(data: PreparedData) -> str:
    """The one line that says the data is ready."""
    n = len(data.train_shards) + len(data.val_shards)
    return (f"data: {data.train_tokens:,} train tokens, {data.val_tokens:,} val tokens in {n} shard"
            f"{'s' if n != 1 else ''} (cache {data.directory})")  # fmt: skip


def prepare(
    cfg: DataConfig, block_size: int, tokenizer: Tokenizer | None = None, show_progress: bool = True,
    ranks: Ranks | None = None,
) -> PreparedData:  # fmt: skip
    """Tokenize ``cfg.path`` into cached shards (or reuse them) and check they hold full windows.

    ``tokenizer`` (fine-tuning reuses the model's) is used as is; without one it is built from
    ``cfg`` (char and bpe from the corpus itself). ``ranks``: every rank of the job calls this
    together and they share the work (None: this process alone)."""
    ranks = dataclasses.replace(ranks, patient=True) if ranks is not None else Ranks()
    src, cache = resolve_path(cfg.path), resolve_path(cfg.cache_dir)
    files = input_files(src)
    stamps = file_stamps(files)  # before the content hash: any write after it is seen at the end
    built_from_corpus = cfg.tokenizer in ("char", "bpe")
    if tokenizer is None and not built_from_corpus:
        tokenizer = build_tokenizer(cfg.tokenizer, lambda: (), cfg.vocab_size, cfg.tokenizer_path)
    # a char/bpe tokenizer is not known before it is built from the corpus: key by its recipe instead,
    # the special tokens included (a folder built before the tool tokens holds a tokenizer without them)
    recipe = [cfg.tokenizer, list(NEW_SPECIALS)]
    recipe += [cfg.vocab_size, cfg.bpe_train_bytes] if cfg.tokenizer == "bpe" else []
    keys = [cache_key(cfg, files, tokenizer.fingerprint() if tokenizer else recipe)]
    if tokenizer is not None and built_from_corpus:  # resuming: the folder that built this tokenizer
        keys.append(cache_key(cfg, files, recipe))
    fingerprint = tokenizer.fingerprint() if tokenizer else None
    _remove_stale_temp(cache)
    found = _find_cached(cache, cfg.name, keys, fingerprint)
    if found is not None and _set_aside_if_bad(found, tokenizer, ranks):
        found = None
    target = cache / f"{cfg.name}-{keys[0]}"
    if ranks.sum([found is not None])[0] == ranks.world_size:
        data = load_prepared(found, tokenizer)
    else:
        built = _build(cfg, src, files, stamps, tokenizer, target, show_progress, ranks)
        if built is None:  # the nodes do not share data.cache_dir: the first process of each prepares
            error = None
            if ranks.local_rank == 0:
                try:
                    built = _build(cfg, src, files, stamps, tokenizer, target, show_progress, Ranks())
                except UserError as e:
                    error = e
            ranks.agree(error)
            if built is None:
                built = load_prepared(_find_cached(cache, cfg.name, keys, fingerprint) or target, tokenizer)
        data = built
    need = block_size + 1
    if data.train_tokens < need or ((cfg.val_fraction > 0 or cfg.val_tokens) and data.val_tokens < need):
        raise DataError(
            f"{cfg.path}: {data.train_tokens} train and {data.val_tokens} val tokens, but one window "
            f"needs block_size + 1 = {need}; use a smaller model.block_size, a smaller "
            f"data.val_fraction or data.val_tokens, or more text"
        )
    if show_progress and ranks.is_main:
        print(summary(data), file=sys.stderr, flush=True)
    return data


def _set_aside_if_bad(found: Path, tokenizer: Tokenizer | None, ranks: Ranks) -> bool:
    """Whether the cache entry ``found`` is damaged or poisoned (unreadable shards, token ids outside
    the vocabulary); if so the first process of each node sets it aside, to be built again."""
    try:
        problem = check_token_ids(load_prepared(found, tokenizer))
    except DataError as e:
        problem = str(e)
    bad = ranks.max([int(bool(problem))])[0] > 0
    if bad and ranks.local_rank == 0 and found.exists():
        print(f"notice: the prepared data in {found} is bad ({(problem or 'on another rank')[:200]}); "
              "rebuilding it", file=sys.stderr)  # fmt: skip
        aside = found.with_name(f".tmp-bad-{found.name}-{_HOST}-{os.getpid()}")
        try:
            os.replace(found, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:  # another node's process moved it first (a shared cache)
            pass
    ranks.barrier()
    return bad


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
    cfg: DataConfig, src: Path, files: list[Path], stamps: list[tuple[int, int, int]], tok: Tokenizer | None,
    target: Path, show_progress: bool, ranks: Ranks,
) -> PreparedData | None:  # fmt: skip
    """Prepare into a temp folder, then rename it into place: a half-built folder never looks complete.
    With several ranks, all write into rank 0's temp folder; None when some rank cannot see it (the
    nodes have their own disks)."""
    units = input_units(files, cfg.text_field)  # checks every Parquet file's column before any work
    if not units:
        raise no_text(src, files)
    # named after rank 0's host and pid: a later start on that host removes it once the process is gone
    host, pid = ranks.broadcast(_HOST_CRC), ranks.broadcast(os.getpid())
    tmp = target.with_name(f".tmp-{target.name}-h{host:08x}-{pid}")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    if ranks.sum([int(tmp.is_dir())])[0] < ranks.world_size:
        ranks.barrier()  # everyone has looked before it goes
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
    try:
        error = None
        if ranks.is_main:
            try:
                if tok is None:  # char/bpe: rank 0 builds it (bpe reads at most bpe_train_bytes)
                    texts = lambda: iter_documents(src, cfg.text_field)
                    tok = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path,
                                          cfg.bpe_train_bytes)  # fmt: skip
                tok.save(tmp)
            except UserError as e:
                error = e
        ranks.agree(error)
        if tok is None:
            tok = load_tokenizer(tmp / "tokenizer.json")  # the one rank 0 built
        parts = plan_parts(units, PART_BYTES)
        n_parts = tokenize_parts(cfg, parts, tok, tmp, ranks, show_progress)
        ranks.agree(_changed(files, stamps) if ranks.is_main else None)  # the tokens are of the keyed bytes
        if ranks.is_main:
            val_writer = ShardWriter(tmp, "val", cfg.shard_tokens, tok.vocab_size)  # for the token cuts
            finish(cfg, src, files, tok, tmp, n_parts, val_writer)
            if target.exists() and not (target / "meta.json").is_file():
                shutil.rmtree(target)  # the leftover of an interrupted run
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "meta.json").is_file():
                    raise
                # another process finished the same folder first: theirs is identical, use it
        ranks.barrier()
    finally:
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(target, tok)

