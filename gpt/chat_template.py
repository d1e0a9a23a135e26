"""The chat template: the only place where a dialog becomes tokens and a loss mask, and where a
conversation becomes the prompt of the next reply (training, chat, evaluation and serving all use it).

A dialog is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``: an
optional system message first, then user and assistant turns alternating. It renders as

    <|endoftext|>System: Be brief.<|end_of_turn|>
    User: What is 12 + 30?<|end_of_turn|>
    Assistant: 42<|end_of_turn|>

where the two special tokens come from the renderer only (``Tokenizer.encode`` never produces them,
so a user who types ``<|end_of_turn|>`` or ``\\nAssistant:`` writes plain text inside the turn). The
loss mask covers exactly each assistant turn's content and its end-of-turn token.

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
from gpt.tokenizer import EOT_TURN, Tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}


def check_messages(messages: Any, final_role: str | None = "assistant") -> list[tuple[int, str]]:
    """Every problem of a dialog as (message index, text): roles, empty content, turn order, and
    (unless ``final_role`` is None) the role of the last turn: "assistant" for training data,
    "user" for a conversation awaiting its reply."""
    if not isinstance(messages, list) or not messages:
        return [(0, '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')]
    problems: list[tuple[int, str]] = []
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            problems.append((i, 'each message must be an object with "role" and "content"'))
            continue
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            problems.append((i, f"unknown role {role!r} (expected system, user or assistant)"))
        elif role == "system" and i > 0:
            problems.append((i, "a system message may only come first"))
        elif role != "system" and role != expected:
            article = "an" if expected == "assistant" else "a"
            problems.append((i, f"turns must alternate: expected {article} {expected} turn, got {role}"))
        if not isinstance(content, str):
            problems.append((i, '"content" must be a string'))
        elif not content.strip():
            problems.append((i, f"empty content in the {role} turn"))
        if role in ("user", "assistant"):
            expected = "assistant" if role == "user" else "user"
    last = messages[-1]
    if not problems and final_role is not None and last.get("role") != final_role:
        wanted = "an assistant reply" if final_role == "assistant" else f"a {final_role} turn"
        problems.append((len(messages) - 1, f"the dialog ends with a {last.get('role')} turn; it must "
                                            f"end with {wanted}"))  # fmt: skip
    return problems


def _turn(tokenizer: Tokenizer, role: str, content: str, first: bool) -> tuple[list[int], list[int]]:
    """(marker ids, content ids + end-of-turn): the marker and the content are encoded separately,
    so no token ever spans both and a reply's tokens are the same whether trained or generated."""
    head = tokenizer.encode(MARKERS[role] if first else "\n" + MARKERS[role])
    return head, [*tokenizer.encode(" " + content.strip()), tokenizer.special_id(EOT_TURN)]


def render_turns(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]
                 ) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
    """(ids, loss_mask, turn_ends): <|endoftext|>, then each turn as marker, content, end-of-turn;
    loss_mask[i] = 1 where ids[i] is an assistant's content or its end-of-turn; turn_ends[k] is
    len(ids) after turn k. A char tokenizer that lacks a character raises DataError naming it."""
    if tokenizer.chat_template is not None:
        return render_jinja(tokenizer, messages, add_generation_prompt=False)
    ids, mask, ends = [tokenizer.eot_id], [0], []
    for k, m in enumerate(messages):
        head, body = _turn(tokenizer, m["role"], m["content"], first=k == 0)
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        ends.append(len(ids))
    return ids, mask, ends


def render_dialog(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole dialog: what SFT trains on."""
    ids, mask, _ = render_turns(tokenizer, messages)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The ids that precede the next assistant reply: the history (ending with a user turn) and the
    opening ``\\nAssistant:``; exactly the training rendering cut before the reply's content. (A model's
    own template: its rendering with add_generation_prompt.)"""
    if tokenizer.chat_template is not None:
        return render_jinja(tokenizer, messages, add_generation_prompt=True)[0]
    ids, _, _ = render_turns(tokenizer, messages)
    return ids + tokenizer.encode("\n" + MARKERS["assistant"] if messages else MARKERS["assistant"])


def fit_dialog(ids: list[int], mask: list[int], ends: list[int], messages: Sequence[dict[str, Any]],
               max_tokens: int) -> tuple[list[int], list[int]] | None:  # fmt: skip
    """Cut a rendered dialog to at most ``max_tokens`` ids at a turn boundary: the system prompt and
    the first exchanges that fit (ending with an assistant turn); None if not even one fits."""
    if len(ids) <= max_tokens:
        return ids, mask
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant" and ends[k] <= max_tokens),
               default=None)  # fmt: skip
    return None if last is None else (ids[: ends[last]], mask[: ends[last]])


def fit_history(tokenizer: Tokenizer, messages: list[dict[str, Any]], max_tokens: int
                ) -> tuple[list[int], int]:  # fmt: skip
    """(prompt ids, dropped turns): the prompt for the next reply after dropping the oldest
    user/assistant exchanges (never the system prompt, never the last user turn) until it fits."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = list(messages[len(system) :]), 0
    while True:
        ids = render_prompt(tokenizer, system + turns)
        if len(ids) <= max_tokens or len(turns) <= 1:
            return ids, dropped
        turns, dropped = turns[2:], dropped + 2  # one user turn and its reply
