"""OpenAI's ``tools`` in chat completions: the request's tools and ``tool_choice`` checked, the plan the
batcher decodes with (stop, forced and banned tokens), and a reply read back as text or ``tool_calls``.

The server runs no tool: it returns the calls, and the client answers each with a ``role: "tool"``
message. Two formats (``gpt.tool_calls``): ours (<|tool_call|>{json}<|tool_call_end|>, a stop token: one
call per reply) and Hermes' ``<tool_call>`` blocks, for an imported model whose own template writes them
(generated to the end of the turn, then parsed).

    plan = tool_plan(params, tokenizer)       # None without tools; ApiError 400 for a bad tool or choice
    splitter = ReplySplitter(plan)            # per streamed choice: content until a call starts
    message, reason = reply_message(plan, tokenizer, text, finish)

tool_choice: ``none`` bans <|tool_call|> (Hermes: the template is not shown the tools and nothing is
parsed); ``required`` forces the reply to open a call (Hermes: ``<tool_call>\n`` as text); a named
function forces the opening of its call up to its arguments; both then ban a second <|tool_call|>.
A call that is not valid JSON or names a function not in ``tools`` comes back as plain text with
finish_reason "stop", as vLLM's parsers do: the client sees what the model wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gpt.errors import DataError
from gpt.serve.batcher import Finish
from gpt.serve.protocol import ApiError
from gpt.tokenizer import TOOL_CALL, TOOL_CALL_END, Tokenizer
from gpt.tool_calls import ToolCall, parse_hermes, split_reply, uses_hermes

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_HERMES_OPEN = "<tool_call>"
_SHAPE = '{"type": "function", "function": {"name": ...}}'


@dataclass(frozen=True)
class ToolPlan:
    """How one request decodes and reads its reply."""

    tools: list[dict[str, Any]]  # as sent: for a model's own template to show
    names: frozenset[str]
    choice: str  # "auto" | "none" | "required" | "function"
    hermes: bool
    marker: str  # the text that opens a call
    prefix: tuple[int, ...] = ()  # forced start of every reply
    banned: frozenset[int] = frozenset()  # never sampled
    stops: frozenset[int] = frozenset()  # extra stop tokens


def tool_plan(params: dict[str, Any], tokenizer: Tokenizer) -> ToolPlan | None:
    """The plan of a chat request with ``tools`` (None without); ApiError 400 naming the field."""
    tools, choice = params.get("tools"), params.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools': declare the functions the model may call",
                           param="tool_choice")  # fmt: skip
        return None
    names = _check_tools(tools)
    kind, name = _check_choice(choice, names)
    hermes = uses_hermes(tokenizer)
    if not hermes and not (tokenizer.has_tools and tokenizer.chat_template is None):
        raise ApiError(400, "'tools': this model cannot call tools (its tokenizer has no tool-call tokens "
                       "and its chat template writes no <tool_call>); send the request without tools",
                       param="tools")  # fmt: skip
    marker = _HERMES_OPEN if hermes else TOOL_CALL
    opening = [] if hermes else [tokenizer.special_id(TOOL_CALL)]
    opener = "<tool_call>\n" if hermes else ""
    start = {"required": opener, "function": opener + '{"name": ' + json.dumps(name) + ', "arguments": '}
    prefix: list[int] = []
    if kind in start:
        try:
            prefix = opening + tokenizer.encode(start[kind])
        except (DataError, UnicodeEncodeError) as e:
            raise ApiError(400, f"'tool_choice': {str(e)[:200]}", param="tool_choice") from None
    # none: no call; required or named: the call is open already and the reply ends with it
    banned = frozenset(opening) if kind != "auto" else frozenset()
    stops = frozenset() if hermes else frozenset([tokenizer.special_id(TOOL_CALL_END)])
    return ToolPlan(tools, names, kind, hermes, marker, tuple(prefix), banned, stops)


def _check_tools(tools: Any) -> frozenset[str]:
    """The declared functions' names; 400 naming the first malformed entry."""
    if not isinstance(tools, list):
        raise ApiError(400, f"'tools' must be a list of {_SHAPE}", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ApiError(400, f"'{where}' must be {_SHAPE}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, f"'{where}.function.name' must be 1-64 letters, digits, _ or -, got "
                           f"{str(name)[:80]!r}", param="tools")  # fmt: skip
        if name in names:
            raise ApiError(400, f"'{where}.function.name': {name!r} is declared twice", param="tools")
        names.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise ApiError(400, f"'{where}.function.description' must be a string", param="tools")
        problem = schema_problem(fn.get("parameters", {"type": "object"}), top=True)
        if problem:
            raise ApiError(400, f"'{where}.function.parameters' is not a valid JSON schema: {problem}"[:300],
                           param="tools")  # fmt: skip
    return frozenset(names)


def schema_problem(schema: Any, top: bool = False, depth: int = 0) -> str | None:
    """What makes ``schema`` not a JSON schema (a structural check: types, properties, required,
    items, enum), or None. The top level must describe an object, as OpenAI requires."""
    if depth > 32:
        return "nested too deep"
    if not isinstance(schema, dict):
        return f"a schema must be a JSON object, got {type(schema).__name__}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _TYPES for k in kinds):
        return f'"type" must be one of {sorted(_TYPES)} (or a list of them), got {kind!r}'
    if top and kinds != ["object"]:
        return f'the parameters must have "type": "object", got {kind!r}'
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        return '"properties" must be an object mapping names to schemas'
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return '"required" must be a list of property names'
    if "enum" in schema and not isinstance(schema["enum"], list):
        return '"enum" must be a list'
    for key, sub in [*props.items(), *([("items", schema["items"])] if "items" in schema else [])]:
        problem = schema_problem(sub, depth=depth + 1)
        if problem:
            return f"{key}: {problem}"
    return None


def _check_choice(choice: Any, names: frozenset[str]) -> tuple[str, str | None]:
    """(kind, function name) of ``tool_choice``; 400 for anything else."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"'tool_choice' must be \"auto\", \"none\", \"required\" or {_SHAPE}",
                       param="tool_choice")  # fmt: skip
    if fn["name"] not in names:
        raise ApiError(400, f"'tool_choice' names {fn['name'][:80]!r}, which is not among 'tools' "
                       f"({', '.join(sorted(names))})", param="tool_choice")  # fmt: skip
    return "function", fn["name"]


def read_reply(plan: ToolPlan, tokenizer: Tokenizer, text: str, finish: Finish) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished reply: calls only when every one is well formed and declared;
    otherwise the whole text as the model wrote it (its call included) and no calls."""
    end = tokenizer.decode([finish.stop_token]) if finish.stop_token in plan.stops else ""
    if plan.choice == "none":
        return text, []
    if plan.hermes:
        content, calls, problems = parse_hermes(text)
    else:  # the stop token that ended a call is not among the reply's ids: it closes the call
        content, calls, problems = split_reply(tokenizer, finish.ids + ([finish.stop_token] if end else []))
    if problems or not calls or any(c.name not in plan.names for c in calls):
        return text + end, []
    return content, calls


def reply_message(plan: ToolPlan, tokenizer: Tokenizer, text: str, finish: Finish
                  ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """(choices[i].message, finish_reason) of a whole reply."""
    content, calls = read_reply(plan, tokenizer, text, finish)
    if not calls:
        return {"role": "assistant", "content": content}, finish.finish_reason
    message = {"role": "assistant", "content": content or None, "tool_calls": [c.to_openai() for c in calls]}
    return message, "tool_calls"


class ReplySplitter:
    """One streamed choice's text: content is sent until a call opens, then held until the end (a call
    is a call only once it parses). Holds back a tail that may be the start of the marker."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent, self.in_call = plan, "", 0, False

    def push(self, piece: str) -> str:
        """The content to send now."""
        self.text += piece
        if self.in_call or self.plan.choice == "none":
            return "" if self.in_call else self._release(len(self.text))
        marker = self.plan.marker
        at = self.text.find(marker, max(0, self.sent - len(marker)))
        if at >= 0:
            self.in_call = True
            return self._release(at)
        hold = max((k for k in range(1, len(marker)) if self.text.endswith(marker[:k])), default=0)
        return self._release(len(self.text) - hold)

    def _release(self, end: int) -> str:
        out = self.text[self.sent : max(self.sent, end)]
        self.sent = max(self.sent, end)
        return out

    def finish(self, tokenizer: Tokenizer, finish: Finish) -> tuple[list[dict[str, Any]], str]:
        """The last deltas of the choice and its finish_reason: the text held back, or the calls as
        OpenAI streams them (the call's id, type and name with arguments "", then the arguments)."""
        content, calls = read_reply(self.plan, tokenizer, self.text, finish)
        if not calls:
            rest = content[self.sent :]
            return ([{"content": rest}] if rest else []), finish.finish_reason
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(calls):
            entry = call.to_openai()
            args = entry["function"]["arguments"]
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})  # fmt: skip
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": args[k : k + 16]}}]}
                       for k in range(0, len(args), 16)]  # fmt: skip
        return deltas, "tool_calls"
