"""Tool calls: what one looks like in a message, in our tokens and in the Hermes text format, and how a
generated reply is read back into its text and its calls.

Messages carry calls as OpenAI sends them (``gpt.chat_template`` renders them)::

    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "calculator", "arguments": "{\\"expression\\": \\"123*456\\"}"}}]}
    {"role": "tool", "tool_call_id": "call_1", "content": "56088"}

Our models write a call between <|tool_call|> and <|tool_call_end|> as the JSON body
``{"name": "calculator", "arguments": {"expression": "123*456"}}`` (``call_body``), the same body as the
Hermes format that Qwen2.5-style templates use as text: ``<tool_call>\\n{...}\\n</tool_call>``.

    content, calls, problems = parse_reply(tokenizer, reply_ids)

A call that is not a JSON object with a string "name" and an object "arguments" is a problem (a line of
text saying why), never an exception: the caller decides (the server returns such a reply as text).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from gpt.tokenizer import TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END, Tokenizer

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name, its arguments (a JSON object) and the id its result answers."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())

    def to_openai(self) -> dict[str, Any]:
        """The entry of an assistant message's ``tool_calls`` (arguments as a JSON string)."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def new_call_id() -> str:
    """A fresh id, shaped as OpenAI's are (``call_`` and 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def call_body(name: str, arguments: dict[str, Any]) -> str:
    """The JSON text between <|tool_call|> and <|tool_call_end|> (and inside Hermes' <tool_call>)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def parse_body(text: str, call_id: str | None = None) -> ToolCall | str:
    """The call a body describes, or the problem with it (a string)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return f"the tool call is not valid JSON: {text[:200]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return f'the tool call must be a JSON object with a "name": {text[:200]!r}'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            args = json.loads(args)
        except ValueError:
            return f"the arguments of {obj['name']!r} are not valid JSON: {args[:200]!r}"
    if not isinstance(args, dict):
        return f'the "arguments" of {obj["name"]!r} must be a JSON object'
    return ToolCall(obj["name"], args) if call_id is None else ToolCall(obj["name"], args, call_id)


def message_call(entry: Any) -> ToolCall | str:
    """A ToolCall from an entry of an assistant message's ``tool_calls`` (OpenAI's shape; arguments a
    JSON string or an object), or the problem with it."""
    fn = entry.get("function") if isinstance(entry, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return 'each tool call must be {"id": ..., "function": {"name": ..., "arguments": ...}}'
    if not isinstance(entry.get("id", ""), str):
        return 'a tool call\'s "id" must be a string'
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            return f"the arguments of {fn['name']!r} are not valid JSON: {args[:200]!r}"
    if not isinstance(args, dict):
        return f'the "arguments" of {fn["name"]!r} must be a JSON object or a string holding one'
    return ToolCall(fn["name"], args, entry.get("id") or new_call_id())


def split_reply(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, list[ToolCall], list[str]]:
    """(text, calls, problems) of a reply in our tokens: the text outside the calls (results, if the
    engine forced any, are left out), each well-formed call, and a line per malformed or unterminated
    one (whose body then stays in the text, so nothing the model wrote is lost)."""
    call, call_end = tokenizer.special_id(TOOL_CALL), tokenizer.special_id(TOOL_CALL_END)
    result, result_end = tokenizer.special_id(TOOL_RESULT), tokenizer.special_id(TOOL_RESULT_END)
    text: list[int] = []
    calls: list[ToolCall] = []
    problems: list[str] = []
    i = 0
    while i < len(ids):
        t = ids[i]
        if t in (call, result):
            end = call_end if t == call else result_end
            j = next((j for j in range(i + 1, len(ids)) if ids[j] == end), len(ids))
            if t == call:
                body = tokenizer.decode(ids[i + 1 : j])
                parsed = parse_body(body) if j < len(ids) else f"unterminated tool call: {body[:200]!r}"
                if isinstance(parsed, str):
                    problems.append(parsed)
                    text += ids[i + 1 : j]
                else:
                    calls.append(parsed)
            i = j + 1
            continue
        text.append(t)
        i += 1
    return tokenizer.decode(text).strip(), calls, problems


def parse_hermes(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """(text, calls, problems) of a reply in the Hermes format (``<tool_call>\\n{json}\\n</tool_call>``
    blocks); a malformed block stays in the text."""
    calls: list[ToolCall] = []
    problems: list[str] = []

    def take(match: re.Match[str]) -> str:
        parsed = parse_body(match.group(1))
        if isinstance(parsed, str):
            problems.append(parsed)
            return match.group(0)
        calls.append(parsed)
        return ""

    return _HERMES.sub(take, text).strip(), calls, problems


def uses_hermes(tokenizer: Tokenizer) -> bool:
    """Whether the model's own chat template writes calls as Hermes' <tool_call> blocks."""
    return tokenizer.chat_template is not None and "<tool_call>" in tokenizer.chat_template


def parse_reply(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, list[ToolCall], list[str]]:
    """(text, calls, problems) of a generated reply, in whichever format the model writes calls."""
    if tokenizer.has_tools and tokenizer.chat_template is None:
        return split_reply(tokenizer, ids)
    text = tokenizer.decode(ids)
    return parse_hermes(text) if uses_hermes(tokenizer) else (text.strip(), [], [])
