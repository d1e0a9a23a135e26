"""The chat template: the only place where a dialog becomes tokens and a loss mask, and where a
conversation becomes the prompt of the next reply (training, chat, evaluation and serving all use it).

A dialog is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``: an
optional system message first, then user and assistant turns alternating. It renders as

    <|endoftext|>System: Be brief.<|end_of_turn|>
    User: What is 12 + 30?<|end_of_turn|>
    Assistant: 42<|end_of_turn|>

An assistant message may call tools (OpenAI's ``tool_calls``; ``gpt.tool_calls``), each call answered
by a ``{"role": "tool", "tool_call_id": ..., "content": ...}`` message; the reply then goes on in the
next assistant message. The whole reply is one turn:

    Assistant:<|tool_call|>{"name": "calculator", "arguments": {"expression": "123*456"}}<|tool_call_end|>
    <|tool_result|>56088<|tool_result_end|> 56088.<|end_of_turn|>          (one line, no newline)

where the special tokens come from the renderer only (``Tokenizer.encode`` never produces them, so a
user who types ``<|end_of_turn|>`` or ``\\nAssistant:`` writes plain text inside the turn). The loss
mask covers exactly each assistant turn's content, its calls and its end-of-turn token; the results
are the engine's to insert, never trained.

    ids, loss_mask = render_dialog(tokenizer, messages)     # what SFT trains on
    prompt = render_prompt(tokenizer, history)              # ... + "\\nAssistant:", to generate a reply
    prompt, dropped = fit_history(tokenizer, history, max_tokens=block_size - 64)

A model that brings its own Jinja template (``tokenizer.chat_template``: a Hugging Face model's
tokenizer_config.json or chat_template.jinja) is rendered by it instead (``gpt.chat_jinja``), through
the same functions and with the same contract; the choice is made here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt.chat_jinja import render_jinja
from gpt.errors import DataError
from gpt.tokenizer import EOT_TURN, TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END, Tokenizer
from gpt.tool_calls import call_body, message_call

ROLES = ("system", "user", "assistant", "tool")
MARKERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
_NO_TOOLS = ("this model's tokenizer has no tool-call tokens (it was built before tool calls existed); "
             "dialogs with tool calls need a model pretrained with this version")  # fmt: skip


def check_messages(messages: Any, final_role: str | None = "assistant") -> list[tuple[int, str]]:
    """Every problem of a dialog as (message index, text): roles, contents, tool calls, turn order,
    and (unless ``final_role`` is None) how it ends: "assistant" for training data (a reply without
    pending calls), "user" for a conversation awaiting its reply (a user turn, or the results of
    every call of the last reply)."""
    if not isinstance(messages, list) or not messages:
        return [(0, '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')]
    problems: list[tuple[int, str]] = []
    order = _Order()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            problems.append((i, 'each message must be an object with "role" and "content"'))
            continue
        found = _content_problems(m) or order.take(m, i)
        problems += [(i, text) for text in found]
    if not problems and final_role is not None:
        ending = order.ending_problem(final_role)
        if ending:
            problems.append((len(messages) - 1, ending))
    return problems


def _content_problems(m: dict[str, Any]) -> list[str]:
    """What is wrong with one message on its own: its role, content and tool calls."""
    role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        return [f"unknown role {role!r} (expected system, user, assistant or tool)"]
    if role == "assistant" and calls is not None:
        if not isinstance(calls, list) or not calls:
            return ['"tool_calls" must be a non-empty list']
        bad = [c for c in map(message_call, calls) if isinstance(c, str)]
        if bad:
            return bad[:1]
        if content is not None and not isinstance(content, str):
            return ['"content" must be a string or null']
        return []
    if not isinstance(content, str):
        return ['"content" must be a string']
    if role == "tool":
        return [] if isinstance(m.get("tool_call_id", ""), str) else ['"tool_call_id" must be a string']
    return [] if content.strip() else [f"empty content in the {role} turn"]


class _Order:
    """The order of turns: [system] user assistant user ...; a reply that calls tools is followed by one
    tool message per call (by ``tool_call_id``, or in order when it has none), then the reply goes on."""

    def __init__(self) -> None:
        self.expected, self.pending, self.last = "user", [], None

    def take(self, m: dict[str, Any], i: int) -> list[str]:
        role, self.last = m["role"], m
        if role == "system":
            return ["a system message may only come first"] if i > 0 else []
        if self.pending:
            if role != "tool":
                return [f"the tool call {self.pending[0]!r} has no result: each call of a reply is "
                        "followed by a tool message with its tool_call_id"]  # fmt: skip
            call_id = m.get("tool_call_id") or self.pending[0]
            if call_id not in self.pending:
                return [f"tool_call_id {call_id!r} matches no call of the reply before it"]
            self.pending.remove(call_id)
            self.expected = "assistant" if not self.pending else "tool"
            return []
        if role == "tool":
            return ["a tool message must follow an assistant message with tool_calls (it answers a call)"]
        if role != self.expected:
            article = "an" if self.expected == "assistant" else "a"
            return [f"turns must alternate: expected {article} {self.expected} turn, got {role}"]
        calls = [message_call(c) for c in m.get("tool_calls") or []] if role == "assistant" else []
        self.pending = [c.id for c in calls]
        self.expected = "tool" if calls else ("assistant" if role == "user" else "user")
        return []

    def ending_problem(self, final_role: str) -> str | None:
        role = self.last.get("role") if self.last else None
        if self.pending:
            return f"the tool call {self.pending[0]!r} has no result"
        if final_role == "assistant" and (role != "assistant" or self.last.get("tool_calls")):
            return f"the dialog ends with a {role} turn; it must end with an assistant reply"
        if final_role == "user" and role not in ("user", "tool"):
            return f"the dialog ends with a {role} turn; it must end with a user turn"
        return None


def dialog_text(messages: Sequence[dict[str, Any]]) -> str:
    """All the text a rendering of ``messages`` encodes (markers, contents, call bodies, results): what a
    character vocabulary must cover."""
    pieces = [" ".join(MARKERS.values())]
    for m in messages:
        pieces.append(m.get("content") or "")
        pieces += [call_body(c.name, c.arguments) for c in map(message_call, m.get("tool_calls") or [])]
    return "\n".join(pieces)


def _turn(tokenizer: Tokenizer, role: str, content: str, first: bool) -> tuple[list[int], list[int]]:
    """(marker ids, content ids + end-of-turn): the marker and the content are encoded separately,
    so no token ever spans both and a reply's tokens are the same whether trained or generated."""
    head = tokenizer.encode(MARKERS[role] if first else "\n" + MARKERS[role])
    return head, [*tokenizer.encode(" " + content.strip()), tokenizer.special_id(EOT_TURN)]


def _reply_part(tokenizer: Tokenizer, m: dict[str, Any], first: bool, goes_on: bool
                ) -> tuple[list[int], list[int]]:  # fmt: skip
    """(marker ids, trained ids) of an assistant message: the marker unless it ``goes_on`` after tool
    results, its text, then each call as <|tool_call|>{json}<|tool_call_end|>, or <|end_of_turn|> when it
    calls nothing."""
    calls = [message_call(c) for c in m.get("tool_calls") or []]
    if not calls:
        head, body = _turn(tokenizer, "assistant", m["content"], first)
        return ([], body) if goes_on else (head, body)
    if not tokenizer.has_tools:
        raise DataError(_NO_TOOLS)
    head = [] if goes_on else tokenizer.encode(MARKERS["assistant"] if first else "\n" + MARKERS["assistant"])
    body = tokenizer.encode(" " + m["content"].strip()) if (m.get("content") or "").strip() else []
    for c in calls:
        body += [tokenizer.special_id(TOOL_CALL), *tokenizer.encode(call_body(c.name, c.arguments)),
                 tokenizer.special_id(TOOL_CALL_END)]  # fmt: skip
    return head, body


def _result(tokenizer: Tokenizer, content: str) -> list[int]:
    """A tool message: <|tool_result|>text<|tool_result_end|> (forced by the engine, never trained)."""
    if not tokenizer.has_tools:
        raise DataError(_NO_TOOLS)
    ends = tokenizer.special_id(TOOL_RESULT), tokenizer.special_id(TOOL_RESULT_END)
    return [ends[0], *tokenizer.encode(content), ends[1]]


def render_turns(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], tools: list | None = None
                 ) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
    """(ids, loss_mask, turn_ends): <|endoftext|>, then each turn as marker, content, end-of-turn;
    loss_mask[i] = 1 where ids[i] is an assistant's content, call or end-of-turn; turn_ends[k] is
    len(ids) after message k. A char tokenizer that lacks a character raises DataError naming it.
    ``tools`` (OpenAI's tool list) goes to a model's own template; ours does not show it."""
    if tokenizer.chat_template is not None:
        return render_jinja(tokenizer, messages, add_generation_prompt=False, tools=tools)
    ids, mask, ends = [tokenizer.eot_id], [0], []
    for k, m in enumerate(messages):
        goes_on = k > 0 and messages[k - 1]["role"] == "tool"
        if m["role"] == "tool":
            head, body, learn = _result(tokenizer, m["content"]), [], 0
        elif m["role"] == "assistant":
            (head, body), learn = _reply_part(tokenizer, m, k == 0, goes_on), 1
        else:
            (head, body), learn = _turn(tokenizer, m["role"], m["content"], first=k == 0), 0
        ids += head + body
        mask += [0] * len(head) + [learn] * len(body)
        ends.append(len(ids))
    return ids, mask, ends


def render_dialog(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole dialog: what SFT trains on."""
    ids, mask, _ = render_turns(tokenizer, messages)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], tools: list | None = None
                  ) -> list[int]:  # fmt: skip
    """The ids that precede the next assistant reply: the history (ending with a user turn) and the
    opening ``\\nAssistant:``; exactly the training rendering cut before the reply's content. After tool
    results the reply goes on where it stopped, with no marker. (A model's own template: its rendering
    with add_generation_prompt, and ``tools`` for it to show.)"""
    if tokenizer.chat_template is not None:
        return render_jinja(tokenizer, messages, add_generation_prompt=True, tools=tools)[0]
    ids, _, _ = render_turns(tokenizer, messages)
    if messages and messages[-1]["role"] == "tool":
        return ids
    return ids + tokenizer.encode("\n" + MARKERS["assistant"] if messages else MARKERS["assistant"])


def fit_dialog(ids: list[int], mask: list[int], ends: list[int], messages: Sequence[dict[str, Any]],
               max_tokens: int) -> tuple[list[int], list[int]] | None:  # fmt: skip
    """Cut a rendered dialog to at most ``max_tokens`` ids at a turn boundary: the system prompt and
    the first exchanges that fit (ending with a whole assistant reply); None if not even one fits."""
    if len(ids) <= max_tokens:
        return ids, mask
    last = max((k for k, m in enumerate(messages)
                if m["role"] == "assistant" and not m.get("tool_calls") and ends[k] <= max_tokens),
               default=None)  # fmt: skip
    return None if last is None else (ids[: ends[last]], mask[: ends[last]])


def fit_history(tokenizer: Tokenizer, messages: list[dict[str, Any]], max_tokens: int,
                tools: list | None = None) -> tuple[list[int], int]:  # fmt: skip
    """(prompt ids, dropped messages): the prompt for the next reply after dropping the oldest
    exchanges (a user turn and its whole reply, tool calls and results included; never the system
    prompt, never the last user turn) until it fits."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = list(messages[len(system) :]), 0
    while True:
        ids = render_prompt(tokenizer, system + turns, tools)
        later_user = next((k for k in range(1, len(turns)) if turns[k]["role"] == "user"), None)
        if len(ids) <= max_tokens or later_user is None:
            return ids, dropped
        turns, dropped = turns[later_user:], dropped + later_user
