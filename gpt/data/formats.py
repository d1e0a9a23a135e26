"""The dialog formats people have, read as they are into one shape: a list of messages
``{"role": "system" | "user" | "assistant", "content": str}`` (what ``gpt.chat_template`` renders).

JSONL formats, detected per file from its first record (``detect_format``) and printed:

- ``messages`` (OpenAI):  ``{"messages": [{"role": "user", "content": "Hi"}, ...]}``
- ``sharegpt``:           ``{"conversations": [{"from": "human" | "gpt" | "system", "value": "Hi"}, ...]}``
- ``alpaca``:             ``{"instruction": "...", "input": "..." (optional), "output": "..."}``

Plain-text files are ``User:`` / ``Assistant:`` transcripts (read by ``gpt.data.dialogs``), and the
Anthropic HH transcripts of preference pairs (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) are read by
``hh_messages``.

    fmt = detect_format(obj)                  # "messages", "sharegpt", "alpaca" or None
    messages, problems = to_messages(obj, fmt)
"""

from __future__ import annotations

import re
from typing import Any

from gpt.tool_calls import parse_body

FORMATS = ("messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}  # fmt: skip
EXPECTED = {
    "messages": '{"messages": [{"role": ..., "content": ...}, ...]}',
    "sharegpt": '{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}',
    "alpaca": '{"instruction": ..., "input": ... (optional), "output": ...}',
}
KEYS = {"messages": '"messages"', "sharegpt": '"conversations"', "alpaca": '"instruction"/"output"'}
_HH_TURN = re.compile(r"\n\n(Human|Assistant|System): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def detect_format(obj: Any) -> str | None:
    """The format of one JSONL record, from its keys; None when it matches none."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def to_messages(obj: Any, fmt: str) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(messages, problems) of a record in format ``fmt``: the messages are None when the record
    does not have the format's shape (one problem then says what is expected). The messages' roles
    and turn order are checked by ``gpt.chat_template.check_messages``, not here."""
    if detect_format(obj) != fmt:
        missing = KEYS[fmt]
        return None, [f"missing {missing} (the file's first record is {fmt}); expected {EXPECTED[fmt]}"]
    if fmt == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            return None, ['"messages" must be a list of {"role": ..., "content": ...} objects']
        return [dict(m) if isinstance(m, dict) else m for m in msgs], []
    if fmt == "sharegpt":
        turns = obj["conversations"]
        if not isinstance(turns, list) or not turns:
            return None, ['"conversations" must be a non-empty list of {"from": ..., "value": ...} objects']
        messages, problems = [], []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                problems.append(f'turn {i + 1}: each turn must be an object with "from" and "value"')
                continue
            problem = _sharegpt_turn(t, messages)
            if problem is not None:
                problems.append(f"turn {i + 1}: {problem}")
        return (None, problems) if problems else (messages, [])
    # alpaca: the instruction (and its input, when given) is the user turn, the output the reply
    instruction, extra, output = obj["instruction"], obj.get("input") or "", obj["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        return None, ['"instruction", "input" and "output" must be strings']
    user = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return messages, []


def _sharegpt_turn(t: dict[str, Any], messages: list[dict[str, Any]]) -> str | None:
    """Append ShareGPT turn ``t`` to ``messages``; the problem, if any. The function-call variant's
    "function_call" (a JSON call) becomes an assistant message with tool_calls, "observation" its result."""
    speaker = str(t["from"]).lower()
    if speaker == "function_call":
        value = t["value"]
        call = parse_body(value) if isinstance(value, str) else "a function_call value must be a string"
        if isinstance(call, str):
            return call
        messages.append({"role": "assistant", "content": None, "tool_calls": [call.to_openai()]})
    elif speaker == "observation":
        last = messages[-1] if messages else {}
        call_id = (last.get("tool_calls") or [{}])[0].get("id", "")
        messages.append({"role": "tool", "tool_call_id": call_id, "content": t["value"]})
    elif speaker in SHAREGPT_ROLES:
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": t["value"]})
    else:
        return f"unknown speaker {t['from']!r} (expected human, gpt, system, function_call or observation)"
    return None


def hh_messages(text: Any) -> list[dict[str, Any]] | None:
    """The messages of an HH transcript ``"\\n\\nHuman: hi\\n\\nAssistant: hello"``; None when the
    text is not one (no ``Human:`` turn at its start)."""
    if not isinstance(text, str):
        return None
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)  # ["", role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        return None
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in pairs]
