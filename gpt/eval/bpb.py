"""Bits per byte: a model's summed token loss on a text, in bits, divided by the text's UTF-8 bytes.
Unlike the loss per token, it compares models of different tokenizers (a char model and a BPE model
of the same corpus).

    gpt eval bpb ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val
    gpt eval bpb ckpt=out/run data.path=notes/ stride=64 out=bpb.json

    from gpt.eval.bpb import bits_per_byte
    result = bits_per_byte(model, tokenizer, ["To be, or not to be"])   # {"bpb", "tokens", "bytes", ...}

Each document starts after an <|endoftext|> (as in training) and is scored whole through
overlapping windows (``gpt.eval.scoring.rolling_logprobs``), so every token after the first
block has at least ``block_size - stride`` tokens of context. ``data.split=val`` scores the part of
a corpus a run trained on it held out: the val shards ``gpt.data.prepare`` makes of it with the
model's tokenizer (the same code, the same cache: the last ``val_fraction`` of its tokens). During training,
``val_bpb`` is estimated from ``val_loss`` and the val split's bytes per token (``bytes_per_token``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gpt.config import DataConfig
from gpt.data.corpus import iter_pieces
from gpt.data.prepare import prepare
from gpt.data.shards import read_shard
from gpt.device import autocast_for, pick_device, resolve_dtype
from gpt.errors import ConfigError, DataError
from gpt.eval.scoring import rolling_logprobs
from gpt.model import GPT
from gpt.quant import Quantize
from gpt.runs.load import load
from gpt.tokenizer import SPECIAL_TOKENS
from gpt.typed_config import Dtype


@dataclass
class TextConfig:
    """Which text an evaluation reads (the ``data`` group of conf/eval_bpb.yaml, conf/eval_cloze.yaml)."""

    path: str = "data/tinyshakespeare/input.txt"
    """A file, a directory of .txt/.jsonl files, or a glob."""
    jsonl_field: str = "text"
    """.jsonl inputs: the field that holds each document."""
    split: Literal["all", "val"] = "all"
    """'all': the whole text; 'val': the last val_fraction of its tokens, training's val split."""
    val_fraction: float = 0.1
    """split=val: the fraction held out, as in the run's data.val_fraction."""
    val_tokens: int = 0
    """split=val: the tokens held out instead of val_fraction, as in the run's data.val_tokens; 0 = off."""
    max_tokens: int = 0
    """split=val: the run's data.max_tokens (the corpus cut before the split); 0 = all."""
    cache_dir: str | None = None
    """split=val: where the prepared shards are cached; None = training's default (data.cache_dir)."""
    max_bytes: int = 0
    """Read at most this many bytes of the chosen split (whole lines; split=val: whole tokens); 0 = all."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for key in ("max_bytes", "val_tokens", "max_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 0 (0 = off)")


@dataclass
class BpbConfig:
    """``gpt eval bpb``: bits per byte of a text (``gpt eval bpb --help`` lists every key)."""

    ckpt: str = "out/shakespeare_char"
    """The model: a run directory, a checkpoint file, a LoRA run or hf:DIR."""
    data: TextConfig = field(default_factory=TextConfig)
    stride: int | None = None
    """Tokens between window starts; None = half of block_size."""
    batch_size: int = 16
    """Windows run together."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."""
    quantize: Quantize = "none"
    """none | int8: score the model with int8 weights (gpt.quant), as sample.py's quantize."""
    out: str | None = None
    """Also write the result as JSON to this file."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride={self.stride} must be >= 1, or null for half of block_size")


def val_documents(cfg: TextConfig, tokenizer) -> list[list[int]]:
    """Training's val split of ``cfg.path`` under ``tokenizer``: the token ids of the val shards that
    ``gpt.data.prepare`` makes (or finds cached), cut into documents at each <|endoftext|>."""
    keys = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    data_cfg = DataConfig(name="eval", path=cfg.path, text_field=cfg.jsonl_field,
                          val_fraction=cfg.val_fraction, val_tokens=cfg.val_tokens, max_tokens=cfg.max_tokens,
                          **keys)  # fmt: skip
    data = prepare(data_cfg, block_size=0, tokenizer=tokenizer, show_progress=False)
    ids = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in data.val_shards]).tolist()
    docs, start = [], 0
    for i, t in enumerate([*ids, tokenizer.eot_id]):
        if t == tokenizer.eot_id:
            if i > start:
                docs.append(ids[start:i])
            start = i + 1
    if not docs:
        raise DataError(f"{cfg.path}: the val split is empty; use data.split=all or more text")
    return docs


def read_texts(cfg: TextConfig, tokenizer=None) -> list[str]:
    """The documents of ``cfg.path`` (a .txt file is one, a JSONL line is one); ``split=val``: the
    text of training's val split under ``tokenizer`` (``val_documents``)."""
    if cfg.split == "val":
        if tokenizer is None:
            raise ValueError("read_texts(split='val') needs the model's tokenizer")
        docs = [tokenizer.decode_bytes(d).decode("utf-8", "replace") for d in val_documents(cfg, tokenizer)]
    else:
        docs, current = [], []
        for piece in iter_pieces(cfg.path, cfg.jsonl_field):
            current.append(piece.text)
            if piece.doc_end:
                docs.append("".join(current))
                current = []
    return _cut(docs, cfg.max_bytes) if cfg.max_bytes else docs


def _cut(docs: list[str], max_bytes: int) -> list[str]:
    """The first max_bytes bytes of the documents, whole lines (at least one line)."""
    out, left = [], max_bytes
    for d in docs:
        b = d.encode("utf-8")
        if len(b) <= left:
            out.append(d)
            left -= len(b)
            continue
        cut = b.rfind(b"\n", 0, left) + 1
        if cut:
            out.append(b[:cut].decode("utf-8"))
        elif not out:
            out.append(b[: b.find(b"\n") + 1 or len(b)].decode("utf-8"))
        break
    return out


def token_byte_lengths(tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes of each token id below ``size``: shape (size,); special tokens and ids beyond
    the vocabulary count 0 (they stand for no text)."""
    special = {tokenizer.special_id(name) for name in SPECIAL_TOKENS}
    lengths = np.zeros(size, dtype=np.int64)
    for i in range(min(size, tokenizer.vocab_size)):
        if i not in special:
            lengths[i] = len(tokenizer.decode_bytes([i]))
    return lengths


def bytes_per_token(tokenizer, token_arrays: Iterable[np.ndarray]) -> float:
    """Mean UTF-8 bytes per token over the arrays (token shards of a split)."""
    lengths = token_byte_lengths(tokenizer, tokenizer.vocab_size)
    n_tokens = n_bytes = 0
    for arr in token_arrays:
        counts = np.bincount(np.asarray(arr, dtype=np.int64), minlength=len(lengths))[: len(lengths)]
        n_tokens += len(arr)
        n_bytes += int(counts @ lengths)
    return n_bytes / max(n_tokens, 1)


def bits_per_byte(model: GPT, tokenizer, texts: Sequence[str], stride: int | None = None,
                  batch_size: int = 16, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Summed loss (bits) of every token of every text over its UTF-8 bytes; also the loss per
    token (nats) and the counts."""
    docs = [(tokenizer.encode(t), len(t.encode("utf-8"))) for t in texts]
    return score_documents(model, tokenizer, docs, stride, batch_size, progress)


def score_documents(model: GPT, tokenizer, docs: Sequence[tuple[list[int], int]], stride: int | None = None,
                    batch_size: int = 16, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """``bits_per_byte`` of documents given as (token ids, their UTF-8 bytes); each is scored after
    an <|endoftext|>, as training sees a document begin."""
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for ids, nbytes in docs:
        if not ids:
            continue
        logp = rolling_logprobs(model, [tokenizer.eot_id, *ids], stride, batch_size, progress)  # (len(ids),)
        nats -= float(logp.sum())
        n_tokens += len(ids)
        n_bytes += nbytes
    if n_bytes == 0:
        raise DataError("no text to score: the input is empty")
    return {
        "bpb": nats / math.log(2) / n_bytes,
        "loss": nats / n_tokens,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / n_tokens,
    }


def _val_docs(cfg: TextConfig, tokenizer) -> list[tuple[list[int], int]]:
    """The val split's documents as (ids, bytes), the first ``max_bytes`` of them (whole tokens)."""
    lengths = token_byte_lengths(tokenizer, tokenizer.vocab_size)
    out, left = [], cfg.max_bytes or float("inf")
    for ids in val_documents(cfg, tokenizer):
        sizes = lengths[np.asarray(ids)]
        keep = int(np.searchsorted(np.cumsum(sizes), left, side="right")) or (0 if out else 1)
        if keep:
            out.append((ids[:keep], int(sizes[:keep].sum())))
            left -= int(sizes[:keep].sum())
        if keep < len(ids) or left <= 0:
            break
    return out


def evaluate_bpb(cfg: BpbConfig) -> dict[str, Any]:
    """Load the model, read the text, score it; the result with what was scored."""
    device = pick_device(cfg.device)
    loaded = load(cfg.ckpt)
    model, tokenizer = loaded.build(device, cfg.quantize), loaded.tokenizer
    model.eval()
    if cfg.data.split == "val":
        docs = _val_docs(cfg.data, tokenizer)
    else:
        docs = [(tokenizer.encode(t), len(t.encode("utf-8"))) for t in read_texts(cfg.data)]
    stride = min(cfg.stride or model.config.block_size // 2, model.config.block_size)
    t0 = time.time()
    with autocast_for(device, resolve_dtype(cfg.dtype, device)):
        result = score_documents(model, tokenizer, docs, stride, cfg.batch_size, progress=True)
    rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
    return {"ckpt": cfg.ckpt, "data": cfg.data.path, "split": cfg.data.split, "stride": stride, **rounded,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['ckpt']} on {result['data']} ({result['split']}): {result['bytes']} bytes, "
        f"{result['tokens']} tokens ({result['bytes_per_token']:.2f} bytes/token), "
        f"stride {result['stride']}\n"
        f"bpb {result['bpb']:.4f}   loss {result['loss']:.4f} nats/token   ({result['seconds']:.0f} s)"
    )
