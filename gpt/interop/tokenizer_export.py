"""Our tokenizer as Hugging Face tokenizer files, for an exported model directory:

* a Hugging Face ``tokenizer.json`` (kind "hf_json"): the same file back, and tokenizer_config.json
  with its eos/bos/pad tokens;
* GPT-2's byte-level BPE ("gpt2", or "hf" with GPT-2's split pattern): vocab.json + merges.txt, the
  merges recovered from the tiktoken ranks, our special tokens as special added tokens;
* another byte-level BPE (ours, trained with data.tokenizer=bpe): a tokenizer.json (a Split on our
  pattern, byte-level BPE on our ranks), written only if the ``tokenizers`` library gives our ids
  on sample text;
* anything else (char): no files, and a one-line note saying the tokenizer stays ours.

    files, note = tokenizer_files(tokenizer)   # {file name: text}, None or the reason for no files

Where tokenizer files are written, tokenizer_config.json carries a ``chat_template``: the model's own
(a Hugging Face model that brought one), else ``ours_as_jinja``: a Jinja template that renders our chat
template (``gpt.chat_template``) as text whose tokenization is our ``render_prompt`` / ``render_dialog``
ids, with <|endoftext|>, <|end_of_turn|> and the tool tokens (<|tool_call|> ...) as the file's special
tokens; tool calls and results render as ours do (one difference: transformers reads a special token's
text typed by a user as that token; ours never does).
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from gpt.chat_template import MARKERS
from gpt.errors import DataError
from gpt.hf_tokenizer import HFTokenizer, bytes_to_unicode
from gpt.tokenizer import (
    EOT,
    EOT_TURN,
    GPT2_PATTERN,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESULT,
    TOOL_RESULT_END,
    Tokenizer,
)

# text the exported tokenizer.json must encode exactly as ours before it is written
SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "emoji 😀👍🏽 CJK 日本語 中文 한국어, accents e\u0301 naïve café, RTL עברית",
    "   runs     of\t\t\twhitespace   \n\n\n   and trailing   ",
    "numbers 1234567890 3.14159 -42 0xFF 1,000,000 don't we'll I'M",
    'def f(x: int) -> int:\n    return {"a": [x ** 2, x // 3]}  # comment\r\n',
)


def tokenizer_files(tokenizer: Tokenizer) -> tuple[dict[str, str], str | None]:
    """({file name: text}, None), or ({}, one line on why the tokenizer stays ours)."""
    state = tokenizer.to_state()
    kind = state["kind"]
    if kind == HFTokenizer.kind:
        roles = {r: state[r] for r in ("eos_token", "bos_token", "pad_token") if state.get(r) is not None}
        template = chat_template(tokenizer)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "chat_template": template}
        return {"tokenizer.json": json.dumps(state["definition"], ensure_ascii=False),
                "tokenizer_config.json": json.dumps(config, indent=1)}, None  # fmt: skip
    if kind in ("gpt2", "hf") and state["pattern"] == GPT2_PATTERN:
        return _bpe_pair(tokenizer, state), None
    if "mergeable_ranks" in state:
        files = _byte_level_json(tokenizer, state)
        if files is not None:
            return files, None
        return {}, (f"the tokenizers library cannot reproduce this {kind} tokenizer's ids, so no Hugging "
                    "Face tokenizer files were written: the tokenizer stays ours (tokenizer.json of the run)")
    return {}, (f"a {kind} tokenizer has no Hugging Face counterpart, so no Hugging Face tokenizer files "
                "were written: the tokenizer stays ours (tokenizer.json of the run)")  # fmt: skip


def chat_template(tokenizer: Tokenizer) -> str | None:
    """The Jinja chat template an exported model carries: a Hugging Face tokenizer's own, else ours
    (``ours_as_jinja``, with tool calls where the tokenizer has the tool tokens) for a tokenizer that
    has an end-of-turn token, else None (a char tokenizer)."""
    state = tokenizer.to_state()
    if state["kind"] == HFTokenizer.kind:
        # our end of turn is the file's <|end_of_turn|> where it has one, else its eos (HFTokenizer)
        end = EOT_TURN if EOT_TURN in tokenizer.template_specials else state["eos_token"]
        return state.get("chat_template") or ours_as_jinja(state["eos_token"], end, tokenizer.has_tools)
    specials = state.get("special_tokens") or {}
    if EOT not in specials or EOT_TURN not in specials:
        return None
    return ours_as_jinja(EOT, EOT_TURN, tokenizer.has_tools)


def turn_end_id(tokenizer: Tokenizer) -> int:
    """The id a chat reply ends with: <|end_of_turn|> where the tokenizer has it, else the eos token."""
    try:
        return tokenizer.special_id(EOT_TURN)
    except KeyError:
        return tokenizer.eot_id


def ours_as_jinja(start: str, end_of_turn: str, tools: bool = False) -> str:
    """Our chat template (gpt.chat_template) in Jinja: ``start`` (the eos token: our dialogs open with
    it), then each message as its marker, a space, its stripped content and ``end_of_turn``, a newline
    between turns; with add_generation_prompt, the opening of the reply. The markers are tokenized
    apart from the content by our renderer; the split pattern cuts "User: text" at the same places.
    ``tools`` (a tokenizer with the tool tokens): tool calls and results too (``_tool_jinja``); without
    it the template is the one exports had before tool calls, and a "tool" message is refused."""
    if tools:
        return _tool_jinja(start, end_of_turn)
    q = json.dumps  # a JSON string is a Jinja string literal
    return "".join([
        "{%- set markers = " + json.dumps(MARKERS) + " -%}",
        "{{- " + q(start) + " -}}",
        "{%- for message in messages -%}",
        "{%- if message['role'] not in markers -%}",
        "{{- raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') -}}",
        "{%- endif -%}",
        "{{- ('' if loop.first else '\\n') + markers[message['role']] + ' ' + (message['content'] | trim) + "
        + q(end_of_turn) + " -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- ('\\n' if messages else '') + markers['assistant'] -}}",
        "{%- endif -%}",
    ])  # fmt: skip


def _tool_jinja(start: str, end_of_turn: str) -> str:
    """``ours_as_jinja`` with tool calls, as ``render_turns`` renders them: an assistant message's calls
    as <|tool_call|>{"name": ..., "arguments": ...}<|tool_call_end|> after its stripped text (if any), a
    tool message as <|tool_result|>content<|tool_result_end|>, the assistant message after results with
    no marker, and no generation prompt after results (the reply goes on). The call body is ``call_body``
    where arguments come as an object (transformers' ``tojson`` is json.dumps(ensure_ascii=False), keys
    in order); arguments given as a JSON string go in as they are, so they match our ids only when the
    string is json.dumps's own spelling of them (", " and ": " separators, no ASCII escapes)."""
    q = json.dumps
    call = q('{"name": ') + " + (fn.name | tojson) + " + q(', "arguments": ') + \
        " + (args if args is string else args | tojson) + " + q("}")  # fmt: skip
    return "".join([
        "{%- set markers = " + json.dumps(MARKERS) + " -%}",
        "{%- set ns = namespace(prev='', calling=false) -%}",
        "{{- " + q(start) + " -}}",
        "{%- for message in messages -%}",
        "{%- set role = message['role'] -%}",
        "{%- if role == 'tool' -%}",
        "{%- if not ns.calling -%}",
        "{{- raise_exception('a tool message must follow an assistant message with tool_calls') -}}",
        "{%- endif -%}",
        "{{- " + q(TOOL_RESULT) + " + message['content'] + " + q(TOOL_RESULT_END) + " -}}",
        "{%- elif role not in markers -%}",
        "{{- raise_exception('unknown role ' + role + ': expected system, user, assistant or tool') -}}",
        "{%- else -%}",
        "{%- set calls = message.tool_calls if role == 'assistant' and message.tool_calls else [] -%}",
        "{%- if role != 'assistant' or ns.prev != 'tool' -%}",
        "{{- ('' if loop.first else '\\n') + markers[role] -}}",
        "{%- endif -%}",
        "{%- if not calls -%}",
        "{{- ' ' + (message['content'] | trim) + " + q(end_of_turn) + " -}}",
        "{%- elif message.content is string and message.content | trim -%}",
        "{{- ' ' + (message.content | trim) -}}",
        "{%- endif -%}",
        "{%- for c in calls -%}",
        "{%- set fn = c.function if c.function is defined else c -%}",
        "{%- set args = fn.arguments if fn.arguments is defined and fn.arguments else {} -%}",
        "{{- " + q(TOOL_CALL) + " + " + call + " + " + q(TOOL_CALL_END) + " -}}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- set ns.calling = (role == 'assistant' and calls | length > 0)"
        " or (role == 'tool' and ns.calling) -%}",
        "{%- set ns.prev = role -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and ns.prev != 'tool' -%}",
        "{{- ('\\n' if messages else '') + markers['assistant'] -}}",
        "{%- endif -%}",
    ])  # fmt: skip


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that creates ``token``: byte-level BPE on it with only the merges ranked below its
    own leaves exactly two parts."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise DataError(f"token {token!r} is not the result of a merge of lower-ranked tokens")
    return parts[0], parts[1]


def byte_level_vocab(state: dict[str, Any]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(byte-level spelling -> public id of every mergeable token, the merges in rank order)."""
    ranks = {base64.b64decode(k): int(r) for k, r in state["mergeable_ranks"].items()}
    id_map = state.get("id_map")
    b2u = bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)
    vocab = {spell(t): (id_map[r] if id_map else r) for t, r in ranks.items()}
    merges = [tuple(spell(p) for p in _merge_parts(ranks, token))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]  # fmt: skip
    return vocab, merges


def _bpe_pair(tokenizer: Tokenizer, state: dict[str, Any]) -> dict[str, str]:
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's tokenizer class: our special tokens
    as its special added tokens (so a chat template's <|end_of_turn|> or <|tool_call|> is one id), and
    our chat template."""
    vocab, merges = byte_level_vocab(state)
    vocab.update(state["special_tokens"])
    added = {str(i): {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True}
             for name, i in sorted(state["special_tokens"].items(), key=lambda kv: kv[1])}  # fmt: skip
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "added_tokens_decoder": added, "chat_template": chat_template(tokenizer)}  # fmt: skip
    return {
        "vocab.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=1),
    }


def _byte_level_json(tokenizer: Tokenizer, state: dict[str, Any]) -> dict[str, str] | None:
    """tokenizer.json + tokenizer_config.json for a byte-level BPE with its own split pattern; None if
    the library cannot read it or gives other ids than ``tokenizer`` on SAMPLES."""
    vocab, merges = byte_level_vocab(state)
    specials = sorted(state["special_tokens"].items(), key=lambda kv: kv[1])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": state["pattern"]}, "behavior": "Isolated", "invert": False}
    definition = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "decoder": byte_level,
        # ignore_merges: a piece that is itself a token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": [list(m) for m in merges]},
    }  # fmt: skip
    eos = next(name for name, i in specials if i == tokenizer.eot_id)
    try:
        theirs = HFTokenizer(definition, eos)
    except DataError:
        return None
    if theirs.vocab_size != tokenizer.vocab_size or any(
        theirs.encode(text) != tokenizer.encode(text) for text in SAMPLES
    ):
        return None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
              "chat_template": chat_template(tokenizer)}  # fmt: skip
    return {"tokenizer.json": json.dumps(definition, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=1)}  # fmt: skip
