"""A tokenizer from what is on disk: a run's tokenizer.json (``load_tokenizer``), the state a checkpoint
holds (``tokenizer_from_state``), GPT-2's tiktoken rank file (``gpt2_tokenizer``). A file or a state
that cannot be read is one ``DataError`` line naming it.

    tok = load_tokenizer("out/run")                   # out/run/tokenizer.json
    same = tokenizer_from_state(tok.to_state())       # checkpoints store the state
    gpt2 = gpt2_tokenizer()                           # data/gpt2/gpt2.tiktoken, no download

Each kind reads its own state (``from_state`` of ``gpt.tokenizer``'s classes and of
``gpt.hf_tokenizer.HFTokenizer``); here the state's format and kind are checked and a malformed one
becomes one line.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

from gpt.errors import DataError
from gpt.hf_tokenizer import HFTokenizer
from gpt.tokenizer import (
    GPT2_PATTERN,
    KINDS,
    NEW_SPECIALS,
    STATE_FORMAT,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
)
from gpt.typed_config import REPO_ROOT, resolve_path

# each kind a state may name, and the class that reads it
_CLASSES: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": TiktokenTokenizer,
                                        "gpt2": TiktokenTokenizer, "hf": TiktokenTokenizer,
                                        HFTokenizer.kind: HFTokenizer}  # fmt: skip


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from ``Tokenizer.to_state()``; DataError if the state is malformed."""
    try:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"unsupported tokenizer state format {state.get('format')!r}")
        kind = state["kind"]
        if kind not in _CLASSES:
            raise DataError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)}, hf_json)")
        return _CLASSES[kind].from_state(state)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"malformed tokenizer state: {type(e).__name__}: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by ``Tokenizer.save``: its directory or the tokenizer.json itself."""
    p = resolve_path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file {p} not found; pass a directory holding tokenizer.json or the file")
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise DataError("expected a JSON object")
        return tokenizer_from_state(state)
    except (DataError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {p} is corrupt: {e}") from None


def gpt2_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """GPT-2's encoding from a tiktoken rank file (default: the repository's data/gpt2/gpt2.tiktoken).
    The special tokens get the ids after the ranks (<|endoftext|> 50256, <|end_of_turn|> 50257, then
    the tool tokens 50258-50261), inside the GPT-2 models' padded vocabulary of 50304."""
    p = REPO_ROOT / "data" / "gpt2" / "gpt2.tiktoken" if path is None else resolve_path(path)
    ranks = _read_rank_file(p)
    n = max(ranks.values()) + 1
    try:
        return TiktokenTokenizer("gpt2", ranks, GPT2_PATTERN, {s: n + i for i, s in enumerate(NEW_SPECIALS)})
    except DataError as e:
        raise DataError(f"BPE rank file {p} is malformed: {e}") from None


@lru_cache(maxsize=1)
def _read_rank_file(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise DataError(f"BPE rank file {path} not found")
    ranks: dict[bytes, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected 'base64_token rank': {line.strip()!r}") from None
    if not ranks:
        raise DataError(f"BPE rank file {path} is empty")
    return ranks
