"""Hugging Face byte-level BPE files (``vocab.json`` + ``merges.txt``, the GPT-2 family) read into
a tiktoken-backed ``Tokenizer`` whose ids equal the Hugging Face ids.

    from gpt.interop.hf_vocab import hf_bpe_tokenizer
    tok = hf_bpe_tokenizer("models/gpt2")      # or data.tokenizer=hf data.tokenizer_path=models/gpt2
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt.config import resolve_path
from gpt.errors import DataError
from gpt.tokenizer import GPT2_PATTERN, SPECIAL_TOKENS, TiktokenTokenizer, Tokenizer


def hf_bpe_tokenizer(directory: str | Path) -> Tokenizer:
    """A tokenizer from a Hugging Face byte-level BPE pair (``vocab.json`` + ``merges.txt``, GPT-2
    family) in ``directory``; ids equal the Hugging Face ids."""
    d = resolve_path(directory)
    if d.is_file():  # tolerate a path to vocab.json or merges.txt itself
        d = d.parent
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in vocab.items()
    ):
        raise DataError(f"{vocab_path} is malformed: expected a JSON object mapping tokens to ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise DataError(f"{vocab_path} is malformed: several tokens share one id")
    byte_decoder = {ch: b for b, ch in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(byte_decoder[ch] for ch in token)

    # Mergeable tokens: the 256 single bytes, then every merge result in merges.txt order.
    order: list[bytes] = []
    id_of: dict[bytes, int] = {}
    for b in range(256):
        ch = bytes_to_unicode()[b]
        if ch not in vocab:
            raise DataError(f"{vocab_path} lacks the byte-level token {ch!r} for byte {b:#04x}")
        id_of[bytes([b])] = vocab[ch]
    for lineno, (left, right) in _read_merges(merges_path):
        merged = left + right
        if merged not in vocab:
            raise DataError(f"{merges_path}:{lineno}: merge result {merged!r} is not in {vocab_path.name}")
        try:
            token = to_bytes(merged)
        except KeyError:
            raise DataError(f"{merges_path}:{lineno}: {merged!r} is not a byte-level BPE token") from None
        if token not in id_of:  # a token made by two different merges keeps its first priority
            id_of[token] = vocab[merged]
            order.append(token)
    merge_ids = [id_of[t] for t in order]
    if all(a < b for a, b in itertools.pairwise(merge_ids)):
        # GPT-2 style: ids grow with merge order, so the ids themselves are valid tiktoken ranks.
        ranks, id_map = dict(id_of), None
    else:
        singles = [bytes([b]) for b in range(256)]
        ranks = {t: r for r, t in enumerate(singles + order)}
        id_map = [id_of[t] for t in singles + order]
    # Every other vocabulary entry (e.g. <|endoftext|>) is an added token that encode never produces;
    # tiktoken decodes it by its name, so name it by the text it stands for where that is valid UTF-8.
    mergeable_ids = set(id_of.values())
    specials: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i not in mergeable_ids:
            try:
                name = to_bytes(tok).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                name = tok
            specials[name if name not in specials else tok] = i
    next_id = max(vocab.values()) + 1
    for name in SPECIAL_TOKENS:
        if name not in specials:
            specials[name] = next_id
            next_id += 1
    return TiktokenTokenizer("hf", ranks, GPT2_PATTERN, specials, id_map)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as used in vocab.json/merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def _read_merges(path: Path) -> Iterator[tuple[int, tuple[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        yield lineno, (parts[0], parts[1])
