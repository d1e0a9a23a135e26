"""Tokenizers: text <-> token ids, for every model in the framework.

Five kinds share one interface (``Tokenizer``):

* ``"char"``    -- one id per character seen in the corpus (``char_tokenizer(texts)``);
* ``"bpe"``     -- byte-level BPE trained on the corpus with rustbpe (``gpt.data.tokenizers.train_bpe``);
* ``"gpt2"``    -- GPT-2's encoding from the shipped rank file (``gpt.tokenizer_load.gpt2_tokenizer()``);
* ``"hf"``      -- a Hugging Face BPE pair vocab.json + merges.txt, encoded by tiktoken;
* ``"hf_json"`` -- a Hugging Face tokenizer.json (Llama, Mistral, Qwen2), encoded by the ``tokenizers``
  library (``gpt.hf_tokenizer.HFTokenizer``; both HF kinds: ``gpt.interop.hf_vocab.hf_tokenizer(directory)``).

Every tokenizer has the special tokens in ``SPECIAL_TOKENS`` (by name or, for "hf_json", as aliases of
the model's eos token); ``encode`` never produces one (its spelling in text is text); insert them by id::

    tok = build_tokenizer("bpe", lambda: open("corpus.txt"), vocab_size=4096)
    ids = tok.encode("Hello") + [tok.eot_id]
    tok.save("out/run")                       # out/run/tokenizer.json (+ tokenizer.tiktoken)
    same = load_tokenizer("out/run")          # gpt.tokenizer_load; or tokenizer_from_state(tok.to_state())

``to_state()`` is a plain JSON-able dict that fully describes a tokenizer; checkpoints store it, and
each class's ``from_state`` builds the tokenizer back from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from gpt.atomic import atomic_write
from gpt.errors import DataError

EOT = "<|endoftext|>"
EOT_TURN = "<|end_of_turn|>"
SPECIAL_TOKENS = (EOT, EOT_TURN)  # every tokenizer has these
# A tool call and its result (gpt.chat_template renders them, gpt.tool_calls reads them). Tokenizers
# built by this version have them after the two above; one saved by an older version lacks them, and
# then ``has_tools`` is False and tool features refuse.
TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|tool_call_end|>"
TOOL_RESULT, TOOL_RESULT_END = "<|tool_result|>", "<|tool_result_end|>"
TOOL_TOKENS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END)
NEW_SPECIALS = SPECIAL_TOKENS + TOOL_TOKENS  # what a tokenizer built now gets, in this order
KINDS = ("char", "bpe", "gpt2", "hf")  # what data.tokenizer may name ("hf" gives "hf" or "hf_json")
STATE_FORMAT = 1

# GPT-2's split pattern as tiktoken ships it (equivalent to the original, but faster). Hard-coded so
# that nothing here ever needs tiktoken.get_encoding, which downloads.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(ABC):
    """The common interface. Ids are ints in ``[0, vocab_size)``; special tokens included."""

    kind: str
    chat_template: str | None = None  # a model's own Jinja template (HFTokenizer; gpt.chat_jinja)
    chat_template_file: str | None = None  # where it came from (errors name it)

    def __init__(self, special_tokens: dict[str, int]):
        missing = [s for s in SPECIAL_TOKENS if s not in special_tokens]
        if missing:
            raise DataError(f"tokenizer lacks the special tokens {missing}")
        self._special = dict(special_tokens)
        self._fingerprint: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int:
        """The token a document or a reply ends with (the model stops there)."""
        return self._special[EOT]

    @property
    def has_tools(self) -> bool:
        """Whether the tool-call tokens exist (not for a Hugging Face file: its template has its own)."""
        return all(name in self._special for name in TOOL_TOKENS)

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"unknown special token {name!r}; this tokenizer has {sorted(self._special)}")
        return self._special[name]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text: a special token's spelling in ``text`` is text, never its id."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids`` (may end inside a UTF-8 character); specials give their spelling."""

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def to_state(self) -> dict[str, Any]:
        """A plain JSON-able dict that fully describes the tokenizer (see tokenizer_from_state)."""

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json``; returns its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_state(), ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (from a JSONL "\ud800"): escaped, still valid JSON
            text = json.dumps(self.to_state(), ensure_ascii=True)
        atomic_write(path, text)
        return path

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            canonical = json.dumps(self.to_state(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        return self._fingerprint

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> Tokenizer:
        """The tokenizer ``state`` (its ``to_state()``) describes; a missing key or a wrong type raises
        (``gpt.tokenizer_load.tokenizer_from_state`` checks the format and names the fault)."""

    def __reduce__(self):
        # Pickle through the plain state (data workers get tokenizers so); the Rust cores are rebuilt.
        return (type(self).from_state, (self.to_state(),))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size}>"

    def _id_list(self, ids: Iterable[int]) -> list[int]:
        """ids (a list, a numpy array or a tensor) as a list of ints, checked against the vocabulary:
        an id the model's padded embedding could produce but no token has must not pass silently."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for this tokenizer "
                             f"(vocab_size {self.vocab_size})")  # fmt: skip
        return ids


class CharTokenizer(Tokenizer):
    """One id per character; ids follow code-point order, the special tokens come after them."""

    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None):
        if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
            raise DataError("character vocabulary must be a sorted list of distinct single characters")
        n = len(chars)
        super().__init__(special_tokens or {s: n + i for i, s in enumerate(NEW_SPECIALS)})
        self._chars = list(chars)
        # Sorted code points let encode map a whole string with one vectorised searchsorted.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._itos = self._chars + [""] * (max(self._special.values()) + 1 - n)
        for name, i in self._special.items():
            if i < n:
                raise DataError(f"special token {name!r} has id {i}, which belongs to a character")
            self._itos[i] = name

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> list[int]:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, cps)
        if len(self._codepoints):
            known = self._codepoints[np.minimum(idx, len(self._codepoints) - 1)] == cps
        else:
            known = np.zeros(len(cps), dtype=bool)
        if not known.all():
            pos = int(np.argmin(known))
            ch = text[pos]
            raise DataError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the character vocabulary "
                "built from the training corpus; remove it from the text or use a BPE tokenizer "
                "(data.tokenizer=bpe)"
            )
        return idx.tolist()

    def decode(self, ids: Iterable[int]) -> str:
        itos = self._itos
        return "".join([itos[i] for i in self._id_list(ids)])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def to_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": "char", "chars": list(self._chars),
                "special_tokens": dict(self._special)}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CharTokenizer:
        return cls(list(state["chars"]), _special_ids(state))


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE ("bpe", "gpt2", "hf") encoded by tiktoken.

    tiktoken uses a token's rank both as its merge priority and as its id. When the public ids differ
    from the ranks (a Hugging Face vocabulary whose ids are not in merge order), ``id_map[rank]`` gives
    the public id of each mergeable token and encode/decode translate through it.
    """

    def __init__(self, kind: str, mergeable_ranks: dict[bytes, int], pattern: str,
                 special_tokens: dict[str, int], id_map: list[int] | None = None):  # fmt: skip
        super().__init__(special_tokens)
        self.kind, self._ranks, self._pattern = kind, mergeable_ranks, pattern
        self._id_map = None if id_map is None else [int(i) for i in id_map]
        # tiktoken itself would panic (not raise) on these, so check them here.
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise DataError(f"BPE ranks lack the single-byte token for byte {missing[0]:#04x}")
        if len(set(mergeable_ranks.values())) != len(mergeable_ranks):
            raise DataError("BPE ranks contain duplicate ranks")
        internal_special = dict(special_tokens)
        public_ids = [*mergeable_ranks.values(), *special_tokens.values()]
        if self._id_map is not None:
            if sorted(mergeable_ranks.values()) != list(range(len(self._id_map))):
                raise DataError("BPE id_map must have one entry per rank, ranks being 0..n-1")
            # Internally the specials follow the ranks; _to_public/_to_internal translate ids.
            names = sorted(special_tokens, key=special_tokens.get)
            internal_special = {name: len(self._id_map) + k for k, name in enumerate(names)}
            public_ids = self._id_map + [special_tokens[name] for name in names]
        if len(set(public_ids)) != len(public_ids) or min(public_ids) < 0:
            raise DataError("BPE token ids must be distinct non-negative integers")
        self._vocab_size = max(public_ids) + 1
        if self._id_map is not None:
            self._to_public = np.array(public_ids, dtype=np.int64)
            self._to_internal = np.full(self._vocab_size, -1, dtype=np.int64)
            self._to_internal[self._to_public] = np.arange(len(public_ids))
        self._enc = tiktoken.Encoding(
            f"gpt-{kind}", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=internal_special
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: the spelling of a special token in user text stays ordinary text.
        ids = self._enc.encode_ordinary(text)
        return ids if self._id_map is None else self._to_public[ids].tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = self._enc.encode_ordinary_batch(list(texts))
        return batch if self._id_map is None else [self._to_public[ids].tolist() for ids in batch]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = self._id_list(ids)
        if self._id_map is not None:
            internal = self._to_internal[np.asarray(ids, dtype=np.int64)]
            if (internal < 0).any():
                raise ValueError(f"token id {ids[int(np.argmin(internal))]} belongs to no token")
            ids = internal.tolist()
        try:
            return self._enc.decode_bytes(ids)
        except KeyError as e:  # a gap in a non-contiguous vocabulary
            raise ValueError(f"token id belongs to no token: {e}") from None

    def to_state(self) -> dict[str, Any]:
        ranks = {base64.b64encode(b).decode("ascii"): r for b, r in self._ranks.items()}
        state: dict[str, Any] = {"format": STATE_FORMAT, "kind": self.kind, "pattern": self._pattern,
                                 "mergeable_ranks": ranks, "special_tokens": dict(self._special)}  # fmt: skip
        if self._id_map is not None:
            state["id_map"] = list(self._id_map)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TiktokenTokenizer:
        ranks = {base64.b64decode(k, validate=True): int(v) for k, v in state["mergeable_ranks"].items()}
        return cls(state["kind"], ranks, str(state["pattern"]), _special_ids(state), state.get("id_map"))

    def save(self, directory: str | Path) -> Path:
        """Also write ``tokenizer.tiktoken``, the ranks in tiktoken's file format (ranks are the merge
        priorities, which equal the ids unless the state has an ``id_map``)."""
        path = super().save(directory)
        ranked = sorted(self._ranks.items(), key=lambda kv: kv[1])
        lines = "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in ranked)
        atomic_write(path.parent / "tokenizer.tiktoken", lines)
        return path


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """A character-level tokenizer whose vocabulary is every character seen in ``texts``."""
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    if not seen:
        raise DataError("cannot build a character vocabulary: the corpus is empty")
    return CharTokenizer(sorted(seen))


def _special_ids(state: dict[str, Any]) -> dict[str, int]:
    """A saved state's special tokens, {name: id}."""
    return {str(k): int(v) for k, v in state["special_tokens"].items()}
