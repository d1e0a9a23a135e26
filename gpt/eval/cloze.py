"""A cloze task made from any corpus: a corpus-agnostic "HellaSwag" that works offline, for base
models of any tokenizer.

    gpt eval cloze ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val

    from gpt.eval.cloze import cloze_items, score_cloze
    items = cloze_items(held_out_text, n=500, seed=0)     # [{"context", "choices", "answer"}]
    accuracy = score_cloze(model, tokenizer, items)

Each item is ``context_bytes`` of held-out text and four continuations of ``continuation_bytes``
bytes each: the one that follows, and three taken from elsewhere in the same text. Every choice
starts at a word (after whitespace) and has exactly the same length in bytes, so neither a cut
word nor the length gives the answer away: only a model that follows the context beats the 25%
of chance. The choice of highest summed log-probability is the model's answer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from gpt.device import autocast_for, pick_device, resolve_dtype
from gpt.errors import ConfigError, DataError
from gpt.eval.bpb import TextConfig, read_texts
from gpt.eval.scoring import choice_logprobs
from gpt.model import GPT
from gpt.quant import Quantize
from gpt.runs.load import load
from gpt.typed_config import Dtype

CHOICES = 4
WHITESPACE = b" \t\n\r"


@dataclass
class ClozeConfig:
    """``gpt eval cloze``: 4-way choice of the real continuation of held-out text (``--help`` lists
    every key)."""

    ckpt: str = "out/shakespeare_char"
    """The model: a run directory, a checkpoint file, a LoRA run or hf:DIR."""
    data: TextConfig = field(default_factory=TextConfig)
    n: int = 500
    """Items (fewer when the text is too short for them)."""
    context_bytes: int = 96
    """Bytes of text before each cut."""
    continuation_bytes: int = 32
    """Bytes of each of the 4 choices (the real one and 3 from elsewhere)."""
    seed: int = 0
    """Which cut points and distractors are drawn."""
    batch_size: int = 32
    """Sequences scored together."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."""
    quantize: Quantize = "none"
    """none | int8: score the model with int8 weights (gpt.quant), as sample.py's quantize."""
    out: str | None = None
    """Also write the result as JSON to this file."""

    def __post_init__(self) -> None:
        for key in ("n", "context_bytes", "continuation_bytes", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")


def _starts_char(b: bytes, i: int) -> bool:
    """Byte i begins a UTF-8 character (or is the end of the text)."""
    return i >= len(b) or (b[i] & 0xC0) != 0x80


def cloze_items(text: str, n: int = 500, context_bytes: int = 96, continuation_bytes: int = 32,
                seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Up to ``n`` items ``{"context", "choices", "answer"}`` from ``text`` (see the module doc)."""
    b = text.encode("utf-8")
    span = context_bytes + continuation_bytes
    # a cut point: a word starts at i, and a whole number of characters ends at i + continuation_bytes
    cuts = [i for i in range(1, len(b) - continuation_bytes + 1)
            if b[i - 1] in WHITESPACE and b[i] not in WHITESPACE and _starts_char(b, i + continuation_bytes)]
    real = [i for i in cuts if i >= context_bytes]
    if len(real) < 1 or len(cuts) < CHOICES * 2:
        raise DataError(
            f"the text ({len(b)} bytes) is too short for cloze items of {span} bytes; give more text "
            "or smaller context_bytes/continuation_bytes"
        )
    rng = random.Random(seed)
    picked = sorted(rng.sample(real, min(n, len(real))))
    items = []
    for i in picked:
        start = i - context_bytes
        while not _starts_char(b, start):  # never half a character
            start += 1
        answer = b[i : i + continuation_bytes]
        others: list[bytes] = []
        for _ in range(100):  # distractors from elsewhere: no overlap with this item's text
            j = rng.choice(cuts)
            cand = b[j : j + continuation_bytes]
            if abs(j - i) > span and cand != answer and cand not in others:
                others.append(cand)
                if len(others) == CHOICES - 1:
                    break
        if len(others) < CHOICES - 1:
            continue
        choices = [answer, *others]
        rng.shuffle(choices)
        items.append({
            "context": b[start:i].decode("utf-8"),
            "choices": [c.decode("utf-8") for c in choices],
            "answer": choices.index(answer),
        })  # fmt: skip
    return items


def score_cloze(model: GPT, tokenizer, items: list[dict[str, Any]], batch_size: int = 32,
                progress: bool = False) -> float:  # fmt: skip
    """Accuracy: the fraction of items whose real continuation has the highest log-probability."""
    pairs = [(it["context"], it["choices"]) for it in items]
    scores = choice_logprobs(model, tokenizer, pairs, batch_size, progress)
    right = sum(max(range(len(s)), key=s.__getitem__) == it["answer"] for s, it in zip(scores, items))
    return right / max(len(items), 1)


def evaluate_cloze(cfg: ClozeConfig) -> dict[str, Any]:
    device = pick_device(cfg.device)
    loaded = load(cfg.ckpt)
    model, tokenizer = loaded.build(device, cfg.quantize), loaded.tokenizer
    model.eval()
    text = "\n".join(read_texts(cfg.data, tokenizer))
    items = cloze_items(text, cfg.n, cfg.context_bytes, cfg.continuation_bytes, cfg.seed)
    t0 = time.time()
    with autocast_for(device, resolve_dtype(cfg.dtype, device)):
        accuracy = score_cloze(model, tokenizer, items, cfg.batch_size, progress=True)
    n, seconds = len(items), round(time.time() - t0, 1)
    stderr = round((accuracy * (1 - accuracy) / max(n - 1, 1)) ** 0.5, 6)
    return {"ckpt": cfg.ckpt, "data": cfg.data.path, "split": cfg.data.split, "n": n,
            "accuracy": round(accuracy, 6), "stderr": stderr, "chance": 1 / CHOICES,
            "seconds": seconds}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['ckpt']} on {result['n']} cloze items of {result['data']} ({result['split']}), "
        f"chance {100 * result['chance']:.0f}%\n"
        f"accuracy {result['accuracy']:.4f} ± {result['stderr']:.4f}   ({result['seconds']:.0f} s)"
    )
