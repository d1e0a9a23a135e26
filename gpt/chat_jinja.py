"""A model's own Jinja chat template (tokenizer_config.json's ``chat_template`` or chat_template.jinja),
rendered as transformers renders it and tokenized so that user text never produces a special token.

``gpt.chat_template`` calls this when the tokenizer carries a template (``tokenizer.chat_template``);
callers never do. The contract is the same as our own template's: (ids, loss_mask, turn_ends).

How special tokens stay out of user text: the dialog is rendered twice, once as it is and once with
each message's content replaced by a unique placeholder. The placeholder rendering is split on the
placeholders: what lies between them is the template's own text, encoded with the file's special tokens
recognised (``<|im_start|>``, ``<|eot_id|>``); the contents are encoded as plain text, so a user typing
"<|im_end|>" writes seven characters of text. The first rendering checks that the pieces put back
together are exactly what the template renders (a template may ``trim`` the content).

The loss mask covers each assistant content and the template text that follows it up to and including
the first special token (its end of turn: ``<|im_end|>``, ``<|eot_id|>``, ``</s>``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from gpt.errors import DataError
from gpt.hf_tokenizer import HFTokenizer
from gpt.tool_calls import message_call

# Private-use code points: no template adds them and no trim removes them.
_PLACEHOLDER = "\ue000{}\ue001"
_SPLIT = re.compile("\ue000(\\d+)\ue001")


def _raise_exception(message: str) -> None:
    """What a template calls on a dialog it refuses (transformers defines the same global)."""
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """transformers' tojson (Jinja's own sorts keys and escapes HTML): tool schemas and call arguments
    as the model saw them in training."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str, origin: str) -> Any:
    """The compiled template, in transformers' sandbox (immutable, trim_blocks, lstrip_blocks, the
    globals raise_exception and strftime_now, transformers' tojson). DataError naming ``origin`` if it
    is not valid Jinja."""
    from jinja2.exceptions import TemplateError  # jinja2 comes with transformers; only templates need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])  # fmt: skip
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise DataError(f"{origin}: its chat template is not valid Jinja ({e}); fix or remove it") from None


def render_text(tokenizer: HFTokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                tools: list | None = None) -> str:  # fmt: skip
    """The template's text for ``messages`` (and ``tools``, OpenAI's tool list), as transformers'
    apply_chat_template(tokenize=False) gives it. DataError naming the template's file if the template
    raises."""
    origin = tokenizer.chat_template_file or "the model's chat template"
    template = compile_template(tokenizer.chat_template, origin)
    bos = "" if tokenizer.bos_id is None else tokenizer.decode([tokenizer.bos_id])
    try:
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               tools=tools, bos_token=bos, eos_token=tokenizer.decode([tokenizer.eot_id]))
    except Exception as e:  # a template may fail in any way (TemplateError, TypeError, ...)
        raise DataError(f"{origin}: the chat template raised {type(e).__name__}: {e}") from None


def render_jinja(tokenizer: HFTokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                 tools: list | None = None) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
    """(ids, loss_mask, turn_ends) of ``messages`` through the tokenizer's template: loss_mask[i] = 1 on
    an assistant's content and its end-of-turn token; turn_ends[k] = len(ids) after message k's
    content and the end-of-turn that follows it. Tool calls (their arguments as objects, as
    transformers passes them) and ``tools`` are the template's text: DataError if they spell one of
    the file's special tokens. (A call written by a reply with no text is template text, not trained.)"""
    messages = _tool_messages(tokenizer, messages, tools)
    marked = [{**m, "content": _PLACEHOLDER.format(k)} if m["content"] else m for k, m in enumerate(messages)]
    parts = _SPLIT.split(render_text(tokenizer, marked, add_generation_prompt, tools))
    contents = _contents(tokenizer, messages, parts, add_generation_prompt, tools)
    ids = _template_ids(tokenizer, parts[0])
    mask, ends, end_ids = [0] * len(ids), [0] * len(messages), set(tokenizer.template_specials.values())
    for j in range(1, len(parts), 2):  # parts: template, index, template, index, ..., template
        k = int(parts[j])
        body = tokenizer.encode(contents[k])
        tail = _template_ids(tokenizer, parts[j + 1])
        n_end = next((i + 1 for i, t in enumerate(tail) if t in end_ids), 0)
        learn = int(messages[k]["role"] == "assistant")
        ids += body + tail
        mask += [learn] * (len(body) + n_end) + [0] * (len(tail) - n_end)
        ends[k] = len(ids) - len(tail) + n_end
    return ids, mask, ends


def _tool_messages(tokenizer: HFTokenizer, messages: Sequence[dict[str, Any]], tools: list | None
                   ) -> list[dict[str, Any]]:  # fmt: skip
    """The messages as the template gets them: content a string ("" for a reply that only calls), each
    call's arguments an object. DataError if a call or ``tools`` spells a special token of the file."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = [message_call(c) for c in m["tool_calls"]]
            m["tool_calls"] = [{**c.to_openai(), "function": {"name": c.name, "arguments": c.arguments}}
                               for c in calls]  # fmt: skip
        out.append(m)
    text = json.dumps([m.get("tool_calls") for m in out] + [tools], ensure_ascii=False)
    forged = next((name for name in tokenizer.template_specials if name in text), None)
    if forged is not None:
        raise DataError(f"a tool call or tool definition contains the special token {forged!r}; "
                        "remove it (tool text may not spell the template's special tokens)")  # fmt: skip
    return out


def _contents(tokenizer: HFTokenizer, messages: Sequence[dict[str, Any]], parts: list[str],
              add_generation_prompt: bool, tools: list | None) -> list[str]:  # fmt: skip
    """Each message's text as the template puts it in: as given, or stripped (Llama 3's ``| trim``).
    DataError if neither puts the real rendering back together."""
    real = render_text(tokenizer, messages, add_generation_prompt, tools)
    for change in (lambda s: s, str.strip):
        contents = [change(m["content"]) for m in messages]
        joined = "".join(contents[int(p)] if j % 2 else p for j, p in enumerate(parts))
        if joined == real:
            return contents
    origin = tokenizer.chat_template_file or "the model's chat template"
    raise DataError(f"{origin}: the chat template changes the message text in a way that cannot be told "
                    "apart from its own (only trimming is supported); use a simpler template")  # fmt: skip


def _template_ids(tokenizer: HFTokenizer, text: str) -> list[int]:
    """Ids of the template's own text: the file's special tokens by id, the rest as plain text (as
    the tokenizers library splits on added tokens before it encodes the pieces between them)."""
    if not text:
        return []
    pattern = _special_pattern(tuple(sorted(tokenizer.template_specials, key=len, reverse=True)))
    ids: list[int] = []
    for j, piece in enumerate(pattern.split(text)):
        if j % 2:
            ids.append(tokenizer.template_specials[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


@lru_cache(maxsize=8)
def _special_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """A regex that captures any of ``names`` (longest first, so a longer token wins)."""
    return re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "(?!)")
