"""Test helper: GPT-2's tokenizer as a Hugging Face pair (vocab.json + merges.txt), rebuilt offline.

``write_hf_gpt2_files(directory)`` writes the pair from the repository's tiktoken rank file
(data/gpt2/gpt2.tiktoken), so tests can exercise the "hf" tokenizer kind and compare with
``transformers`` without any download.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

from gpt.interop.hf_vocab import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parent.parent
GPT2_RANK_FILE = REPO_ROOT / "data" / "gpt2" / "gpt2.tiktoken"


def _split_in_two(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Run BPE on ``token`` with only the merges ranked below its own: the two parts left are the
    merge that creates it (the standard way to recover merges from tiktoken ranks)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"cannot split {token!r} into two lower-ranked tokens")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def gpt2_hf_pair() -> tuple[str, str]:
    """(vocab.json text, merges.txt text) for GPT-2, built from the rank file."""
    ranks: dict[bytes, int] = {}
    for line in GPT2_RANK_FILE.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    b2u = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    merges = ["#version: 0.2"]
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_in_two(ranks, tok, rank)
            merges.append(f"{spell(left)} {spell(right)}")
    return json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"


def write_hf_gpt2_files(directory: str | Path) -> Path:
    """Write GPT-2's vocab.json and merges.txt into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_hf_pair()
    (directory / "vocab.json").write_text(vocab, encoding="utf-8")
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    return directory
