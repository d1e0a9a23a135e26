"""The tokenizer of a Hugging Face model directory, behind our ``Tokenizer`` interface:

* ``tokenizer.json`` (+ ``tokenizer_config.json``; Llama, Mistral, Qwen2, SmolLM2): ``HFTokenizer``,
  encoded by the ``tokenizers`` library, eot = the config's ``eos_token``;
* ``vocab.json`` + ``merges.txt`` (the GPT-2 family): a tiktoken-backed byte-level BPE whose ids equal
  the Hugging Face ids.

    from gpt.interop.hf_vocab import hf_tokenizer
    tok = hf_tokenizer("models/SmolLM2-135M")   # or data.tokenizer=hf data.tokenizer_path=models/...
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt.chat_jinja import compile_template
from gpt.errors import DataError
from gpt.hf_tokenizer import HFTokenizer, bytes_to_unicode
from gpt.interop.tokenizer_export import ours_as_jinja
from gpt.tokenizer import EOT_TURN, GPT2_PATTERN, SPECIAL_TOKENS, TiktokenTokenizer, Tokenizer
from gpt.typed_config import resolve_path

# Where tokenizer_config.json names no eos_token: the end-of-text tokens of the families we know.
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def hf_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer in a Hugging Face model ``directory`` (or a path to one of its tokenizer files):
    tokenizer.json when present, else vocab.json + merges.txt. DataError naming the file otherwise."""
    d = resolve_path(directory)
    if d.is_file():
        d = d.parent
    if (d / "tokenizer.json").is_file():
        return _tokenizer_json(d)
    if not (d / "vocab.json").is_file() and not (d / "merges.txt").is_file():
        raise DataError(
            f"{d} holds no tokenizer: expected tokenizer.json (Llama, Mistral, Qwen2) or "
            "vocab.json and merges.txt (GPT-2); copy the model's tokenizer files there"
        )
    return _bpe_pair(d)


def _tokenizer_json(d: Path) -> Tokenizer:
    """tokenizer.json through the tokenizers library; bos/eos/pad from tokenizer_config.json."""
    path, config_path = d / "tokenizer.json", d / "tokenizer_config.json"
    definition = read_json(path)
    config = read_json(config_path) if config_path.is_file() else {}
    roles = {role: _token_name(config.get(role)) for role in ("eos_token", "bos_token", "pad_token")}
    if roles["eos_token"] is None:
        added = {t.get("content") for t in definition.get("added_tokens") or [] if isinstance(t, dict)}
        roles["eos_token"] = next((name for name in _EOS_GUESSES if name in added), None)
        if roles["eos_token"] is None:
            raise DataError(f"{config_path} names no eos_token and {path.name} has none of {_EOS_GUESSES}: "
                            'add "eos_token": "<the token the model ends a text with>" to it')  # fmt: skip
    template, template_file = _chat_template(d, config)
    added = {t.get("content") for t in definition.get("added_tokens") or [] if isinstance(t, dict)}
    eot = EOT_TURN if EOT_TURN in added else roles["eos_token"]
    if template in (ours_as_jinja(roles["eos_token"], eot, tools) for tools in (False, True)):
        # our own rendering (with tool calls, or without as older exports), written by `gpt export`:
        # gpt.chat_template renders it with the tokenization the model was trained with (the Jinja
        # path would cut "User: Who" at other places)
        template = template_file = None
    try:
        return HFTokenizer(definition, roles["eos_token"], roles["bos_token"], roles["pad_token"],
                           template, template_file)  # fmt: skip
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _chat_template(d: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the model's Jinja chat template, its file): chat_template.jinja where present (transformers
    prefers it), else tokenizer_config.json's "chat_template" (a string, or a list of named templates:
    "default"). Compiled here so that a template that is not Jinja fails at load, naming its file."""
    jinja_path, config_path = d / "chat_template.jinja", d / "tokenizer_config.json"
    if jinja_path.is_file():
        source, origin = jinja_path.read_text(encoding="utf-8"), jinja_path
    else:
        source, origin = config.get("chat_template"), config_path
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if source is None:
        return None, None
    if not isinstance(source, str):
        raise DataError(f'{origin}: "chat_template" must be a Jinja string (or a list with a "default" one)')
    compile_template(source, str(origin))
    return source, str(origin)


def _token_name(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bpe_pair(d: Path) -> Tokenizer:
    """A tokenizer from a Hugging Face byte-level BPE pair (``vocab.json`` + ``merges.txt``, GPT-2
    family) in ``d``; ids equal the Hugging Face ids."""
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    vocab = _read_vocab(vocab_path)
    decoder = {ch: b for b, ch in bytes_to_unicode().items()}
    id_of, order = _mergeable(vocab, decoder, vocab_path, merges_path)
    merge_ids = [id_of[t] for t in order]
    if all(a < b for a, b in itertools.pairwise(merge_ids)):
        # GPT-2 style: ids grow with merge order, so the ids themselves are valid tiktoken ranks.
        ranks, id_map = dict(id_of), None
    else:
        singles = [bytes([b]) for b in range(256)]
        ranks = {t: r for r, t in enumerate(singles + order)}
        id_map = [id_of[t] for t in singles + order]
    specials = _added_tokens(vocab, set(id_of.values()), decoder)
    return TiktokenTokenizer("hf", ranks, GPT2_PATTERN, specials, id_map)


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: token -> id, every id >= 0 and distinct."""
    vocab = read_json(path)
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for k, v in vocab.items()):  # fmt: skip
        raise DataError(f"{path} is malformed: expected a JSON object mapping tokens to ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise DataError(f"{path} is malformed: several tokens share one id")
    return vocab


def _to_bytes(token: str, decoder: dict[str, int]) -> bytes:
    """The bytes a vocab.json token spells (KeyError: a character outside the byte alphabet)."""
    return bytes(decoder[ch] for ch in token)


def _mergeable(vocab: dict[str, int], decoder: dict[str, int], vocab_path: Path, merges_path: Path
               ) -> tuple[dict[bytes, int], list[bytes]]:  # fmt: skip
    """(bytes -> id of every mergeable token, the merge results in merges.txt order): the 256 single
    bytes, then every merge result."""
    id_of: dict[bytes, int] = {}
    byte_chars = bytes_to_unicode()
    for b in range(256):
        ch = byte_chars[b]
        if ch not in vocab:
            raise DataError(f"{vocab_path} lacks the byte-level token {ch!r} for byte {b:#04x}")
        id_of[bytes([b])] = vocab[ch]
    order: list[bytes] = []
    for lineno, (left, right) in _read_merges(merges_path):
        merged = left + right
        if merged not in vocab:
            raise DataError(f"{merges_path}:{lineno}: merge result {merged!r} is not in {vocab_path.name}")
        try:
            token = _to_bytes(merged, decoder)
        except KeyError:
            raise DataError(f"{merges_path}:{lineno}: {merged!r} is not a byte-level BPE token") from None
        if token not in id_of:  # a token made by two different merges keeps its first priority
            id_of[token] = vocab[merged]
            order.append(token)
    return id_of, order


def _added_tokens(vocab: dict[str, int], mergeable_ids: set[int], decoder: dict[str, int]) -> dict[str, int]:
    """Every other vocabulary entry (e.g. <|endoftext|>) is an added token that encode never produces;
    tiktoken decodes it by its name, so it is named by the text it stands for where that is valid
    UTF-8. Our special tokens missing from the vocabulary get the ids after the last."""
    specials: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i not in mergeable_ids:
            try:
                name = _to_bytes(tok, decoder).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                name = tok
            specials[name if name not in specials else tok] = i
    next_id = max(vocab.values()) + 1
    for name in SPECIAL_TOKENS:
        if name not in specials:
            specials[name] = next_id
            next_id += 1
    return specials


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (vocab.json, config.json, an index); DataError naming the file if
    it is missing, unreadable, not JSON or not an object."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object")
    return data


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
