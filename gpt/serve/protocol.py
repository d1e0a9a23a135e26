"""OpenAI's JSON shapes: request bodies checked field by field, responses and stream chunks built.

Every request field of ``/v1/completions`` and ``/v1/chat/completions`` that we read is checked for
its type and range here; a mistake raises ``ApiError`` (HTTP 400 with OpenAI's error body naming
the field). Fields we do not know are ignored, as OpenAI-compatible servers do. Our extras
``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as additional body fields (the
``openai`` client sends them with ``extra_body=``).

    params = parse_fields(body, CHAT_FIELDS)            # {name: value} of the fields given
    config = generation_config(params, max_new_tokens)  # a GenerationConfig (temperature 0 = greedy)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from gpt.infer.config import GenerationConfig
from gpt.serve.batcher import TokenLogprob


class ApiError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _stop(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list) and len(x) <= 16 and all(isinstance(s, str) for s in x))


# name: (type check, type description, range check or None, range description)
COMMON = {
    "model": (lambda x: isinstance(x, str), "a string", None, ""),
    "max_tokens": (_integer, "an integer", lambda x: x >= 1, ">= 1"),
    "temperature": (_number, "a number", lambda x: 0 <= x <= 2, "in [0, 2] (0 = greedy)"),
    "top_p": (_number, "a number", lambda x: 0 < x <= 1, "in (0, 1]"),
    "n": (_integer, "an integer", lambda x: x >= 1, ">= 1"),
    "stream": (lambda x: isinstance(x, bool), "a boolean", None, ""),
    "stream_options": (lambda x: isinstance(x, dict), "an object", None, ""),
    "stop": (_stop, "a string or a list of at most 16 strings", None, ""),
    "seed": (_integer, "an integer", lambda x: 0 <= x < 2**63 - 64, "in [0, 2**63 - 64)"),
    "presence_penalty": (_number, "a number", lambda x: -2 <= x <= 2, "in [-2, 2]"),
    "frequency_penalty": (_number, "a number", lambda x: -2 <= x <= 2, "in [-2, 2]"),
    "user": (lambda x: isinstance(x, str), "a string", None, ""),
    # our extras
    "top_k": (_integer, "an integer", lambda x: x >= -1, ">= 0 (0 or -1 = no limit)"),
    "min_p": (_number, "a number", lambda x: 0 <= x < 1, "in [0, 1)"),
    "repetition_penalty": (_number, "a number", lambda x: 0 < x <= 10, "in (0, 10] (1 = off)"),
}
COMPLETION_FIELDS = {
    **COMMON,
    "prompt": (lambda x: isinstance(x, (str, list)), "a string or a list", None, ""),
    "logprobs": (_integer, "an integer", lambda x: 0 <= x <= 5, "in [0, 5]"),
    "echo": (lambda x: isinstance(x, bool), "a boolean", None, ""),
}
CHAT_FIELDS = {
    **COMMON,
    "messages": (lambda x: isinstance(x, list), "a list of messages", None, ""),
    "max_completion_tokens": (_integer, "an integer", lambda x: x >= 1, ">= 1"),
    "logprobs": (lambda x: isinstance(x, bool), "a boolean", None, ""),
    "top_logprobs": (_integer, "an integer", lambda x: 0 <= x <= 20, "in [0, 20]"),
}


def parse_fields(body: Any, spec: dict[str, tuple]) -> dict[str, Any]:
    """The known, non-null fields of ``body`` after checking each one's type and range."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    params = {}
    for name, (is_type, type_text, in_range, range_text) in spec.items():
        value = body.get(name)
        if value is None:
            continue
        if not is_type(value):
            raise ApiError(400, f"'{name}' must be {type_text}, got {value!r:.60}", param=name)
        if in_range is not None and not in_range(value):
            raise ApiError(400, f"'{name}' must be {range_text}, got {value!r:.60}", param=name)
        params[name] = value
    return params


def generation_config(params: dict[str, Any], max_new_tokens: int) -> GenerationConfig:
    """The engine's settings for a request; OpenAI's defaults where a field is absent (temperature 1,
    no top-k). temperature 0 is greedy decoding, exactly."""
    top_k = params.get("top_k", 0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=float(params.get("temperature", 1.0)),
        top_k=0 if top_k < 0 else top_k,
        top_p=float(params.get("top_p", 1.0)),
        min_p=float(params.get("min_p", 0.0)),
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
        frequency_penalty=float(params.get("frequency_penalty", 0.0)),
        presence_penalty=float(params.get("presence_penalty", 0.0)),
        stop=params.get("stop", []),
        seed=params.get("seed"),
    )


def prompt_list(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """``prompt`` of /v1/completions as a list: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(_integer(t) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' must not be an empty list", param="prompt")
    for p in prompt:
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(_integer(t) for t in p))
        if not ok:
            raise ApiError(400, "'prompt' must be a string, a list of strings or of token-id lists",
                           param="prompt")  # fmt: skip
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"'prompt' holds a token id outside [0, {vocab_size})", param="prompt")
    return list(prompt)


def chat_messages(messages: list[Any]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template's: text content (a string or text parts), the roles
    system/developer (as system), user and assistant."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                           param="messages")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], created: int | None = None):
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices}  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.decode_bytes([token])
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}  # fmt: skip


def completion_logprobs(tokenizer, entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """``choices[i].logprobs`` of a completion: parallel lists tokens, token_logprobs, top_logprobs
    and text_offset (``offset``: characters of text before the first of these tokens)."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        text, _ = token_text(tokenizer, e.token)
        tokens.append(text)
        offset += len(text)
    top = [{token_text(tokenizer, t)[0]: lp for t, lp in e.top} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}  # fmt: skip
