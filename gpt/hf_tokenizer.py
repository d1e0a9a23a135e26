"""A Hugging Face ``tokenizer.json`` (Llama, Mistral, Qwen2, SmolLM2, GPT-2) as a ``gpt.tokenizer.Tokenizer``:
``HFTokenizer``, and what it needs from the ``tokenizers`` library and nothing more.

    library = read_definition(definition)     # tokenizers.Tokenizer; specials in text stay text
    table = token_bytes(library, definition)  # table[id]: the exact bytes of token id (None: a gap)
    names = special_tokens(library)           # {"<|im_start|>": 1, ...}: the added special tokens

The library encodes (BPE, its normalizers, pre-tokenizers; never re-implemented here). Decoding is
ours: each id's bytes come from a table, so a token that ends inside a UTF-8 character (byte-level BPE,
or a sentencepiece byte-fallback token ``<0xE2>``) gives its raw bytes, which the streaming decoder in
``gpt.infer.sampling`` joins into whole characters. The library's own decoders cannot: they return
text, with U+FFFD where a character is cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from gpt.errors import DataError
from gpt.tokenizer import SPECIAL_TOKENS, STATE_FORMAT, Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"  # "▁": sentencepiece's spelling of a space


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, encoded by the ``tokenizers`` library (read by the functions below).

    ``definition`` is the parsed tokenizer.json; ``eos_token`` (tokenizer_config.json's) is ``eot_id``,
    the token the model was trained to stop at. ``special_id`` knows the file's special tokens by name
    (<|im_start|>, </s>, ...); <|endoftext|> and <|end_of_turn|>, where the file lacks them, name the eos
    token. ``encode`` adds no BOS (a template adds what it wants: ``bos_id``; ``chat_template``: its own).
    """

    kind = "hf_json"

    def __init__(self, definition: dict[str, Any], eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 chat_template_file: str | None = None):  # fmt: skip
        self._definition, self._library = definition, read_definition(definition)
        self.chat_template, self.chat_template_file = chat_template, chat_template_file
        self._roles = {"eos_token": eos_token, "bos_token": bos_token, "pad_token": pad_token}
        ids = {r: self._library.token_to_id(name) for r, name in self._roles.items() if name is not None}
        if None in ids.values():
            role = next(r for r, i in ids.items() if i is None)
            raise DataError(f"{role} {self._roles[role]!r} is not a token of this tokenizer.json")
        self._eos, self.bos_id, self.pad_id = ids["eos_token"], ids.get("bos_token"), ids.get("pad_token")
        self.template_specials = special_tokens(self._library)  # the file's own: what a template may write
        super().__init__({**{name: self._eos for name in SPECIAL_TOKENS}, **self.template_specials})
        self._bytes = token_bytes(self._library, definition)  # (vocab_size,) bytes or None (a gap)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def eot_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._library.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._library.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids, table = self._id_list(ids), self._bytes
        pieces = [table[i] for i in ids]
        if None in pieces:
            raise ValueError(f"token id {ids[pieces.index(None)]} belongs to no token")
        return b"".join(pieces)

    def to_state(self) -> dict[str, Any]:
        template = {"chat_template": self.chat_template, "chat_template_file": self.chat_template_file}
        return {"format": STATE_FORMAT, "kind": self.kind, "definition": self._definition, **self._roles,
                **(template if self.chat_template is not None else {})}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HFTokenizer:
        optional = ("bos_token", "pad_token", "chat_template", "chat_template_file")
        return cls(dict(state["definition"]), str(state["eos_token"]), *map(state.get, optional))


def read_definition(definition: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from a parsed tokenizer.json, set up to encode ordinary text: the
    spelling of a special token in the text is text (``encode_special_tokens``), and the file's padding
    and truncation are off. DataError (one line) if the library cannot read it."""
    import tokenizers  # Rust library; imported where used, like transformers

    try:
        library = tokenizers.Tokenizer.from_str(json.dumps(definition))
    except Exception as e:  # the library raises a bare Exception from Rust
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"the tokenizers library cannot read it ({first})") from None
    model = definition.get("model", {}).get("type")
    if model not in ("BPE", "Unigram"):
        raise DataError(f"its model is {model!r}; only BPE and Unigram (sentencepiece) models are supported")
    library.encode_special_tokens = True  # not stored in the file: set on every load
    library.no_padding()
    library.no_truncation()
    return library


def token_bytes(library: Any, definition: dict[str, Any]) -> list[bytes | None]:
    """``table[id]``: the bytes token ``id`` stands for, ``None`` for an id no token has. Byte-level
    tokens map back through GPT-2's byte alphabet; sentencepiece tokens spell spaces as "▁" and bytes as
    ``<0xHH>`` (byte fallback); added tokens (special or not) are their own text."""
    vocab = library.get_vocab(with_added_tokens=False)  # the model's tokens: {token: id}
    added = library.get_added_tokens_decoder()  # {id: AddedToken}
    n = max([*vocab.values(), *added.keys()], default=-1) + 1
    table: list[bytes | None] = [None] * n
    nodes = [definition.get("pre_tokenizer"), definition.get("decoder")]
    if any(node.get("type") == "ByteLevel" for node in _nodes(nodes)):
        alphabet = {ch: b for b, ch in bytes_to_unicode().items()}
        for token, i in vocab.items():
            try:
                table[i] = bytes(alphabet[ch] for ch in token)
            except KeyError:  # not a byte-level spelling (should not happen): its UTF-8 text
                table[i] = token.encode("utf-8")
    else:
        byte_fallback = bool(definition.get("model", {}).get("byte_fallback"))
        space = next((node["replacement"] for node in _nodes(nodes)
                      if node.get("type") == "Metaspace" and "replacement" in node), _METASPACE)  # fmt: skip
        for token, i in vocab.items():
            m = _BYTE_FALLBACK.fullmatch(token) if byte_fallback else None
            table[i] = bytes([int(m.group(1), 16)]) if m else token.replace(space, " ").encode("utf-8")
    for i, token in added.items():
        table[i] = token.content.encode("utf-8")
    return table


def special_tokens(library: Any) -> dict[str, int]:
    """{name: id} of the added tokens marked special (e.g. <|im_start|>, </s>)."""
    return {t.content: i for i, t in sorted(library.get_added_tokens_decoder().items()) if t.special}


def _nodes(nodes: list[Any]) -> Iterator[dict[str, Any]]:
    """Every component dict in ``nodes`` and in the Sequences inside them."""
    for node in nodes:
        if isinstance(node, dict):
            yield node
            for key in ("pretokenizers", "decoders", "normalizers"):
                yield from _nodes(node.get(key) or [])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as used in vocab.json/merges.txt and
    byte-level tokenizer.json files."""
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
