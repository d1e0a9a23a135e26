"""OpenAI's JSON shapes: request bodies checked in one place, responses and stream chunks built.

A request body is read by one pydantic model per route (``CompletionRequest``, ``ChatRequest``): each
field we read, its type, and the ranges only the API knows (``n``, ``logprobs``, at most 16 ``stop``
strings); fields we do not know are ignored, as OpenAI-compatible servers do. The ranges of the
sampling controls are the engine's: ``generation_config`` builds the ``GenerationConfig`` and its own
validation (``GenerationConfig.validate``) decides, its error naming the API field. Every mistake
raises ``ApiError`` (HTTP 400 with OpenAI's error body naming the field). Our extras ``top_k``,
``min_p`` and ``repetition_penalty`` are accepted as additional body fields (the ``openai`` client
sends them with ``extra_body=``).

    params = parse_request(body, chat=True)              # {name: value} of the fields given
    config = generation_config(params, max_new_tokens)   # a GenerationConfig (temperature 0 = greedy)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpt.errors import ConfigError
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


# ---------------------------------------------------------------------------------------- requests
class _Common(BaseModel):
    """The fields both routes read. Strict: no "3" for 3, no true for 1, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # our extras
    top_k: int | None = None  # -1 = no limit, as 0
    min_p: float | None = None
    repetition_penalty: float | None = None


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(
        min_length=1)] | None = None  # fmt: skip
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A message's shape; its roles and their order are the chat template's (``check_messages``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None  # null in an assistant message that only calls tools
    tool_calls: list[dict[str, Any]] | None = None  # the calls' shapes are gpt.tool_calls' to check
    tool_call_id: str | None = None


class ChatRequest(_Common):
    messages: list[Message] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # checked by gpt.serve.tools (a tool's JSON schema is more than a type)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; our format makes one call per reply


# what a field of several shapes must be (pydantic would name only the first shape it tried)
SHAPES = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
          "stop": "a string or a list of at most 16 strings",
          "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
          "tool_choice": "\"auto\", \"none\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}"}  # fmt: skip


def parse_request(body: Any, chat: bool) -> dict[str, Any]:
    """The known, non-null fields of ``body`` after checking their types (and the API's own ranges)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        raise _api_error(e) from None
    return request.model_dump(exclude_none=True)


def _api_error(e: ValidationError) -> ApiError:
    """The first of pydantic's errors as ours, naming the field (e.g. 'messages[0].content')."""
    first = e.errors(include_input=False, include_url=False)[0]
    where, member = str(first["loc"][0]), False
    for part in first["loc"][1:]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in Message.model_fields or part in TextPart.model_fields:
            where += f".{part}"
        else:  # the name of a union's member: the field may take several shapes
            member = True
            break
    shape = SHAPES.get(where.rsplit(".", 1)[-1]) if member else None
    message = f"'{where}' must be {shape}" if shape else f"'{where}': {first['msg']}"
    return ApiError(400, message[:300], param=str(first["loc"][0]))


# the engine's names of the API's fields, for naming the field of the engine's error
ENGINE_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k",
                "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
                "stop": "stop", "seed": "seed"}  # fmt: skip


def generation_config(params: dict[str, Any], max_new_tokens: int, max_key: str = "max_tokens"
                      ) -> GenerationConfig:  # fmt: skip
    """The engine's settings for a request, checked by the engine's own validation (ApiError 400
    naming the field); OpenAI's defaults where a field is absent (temperature 1, no top-k).
    temperature 0 is greedy decoding, exactly."""
    top_k = params.get("top_k", 0)
    try:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=float(params.get("temperature", 1.0)),
            top_k=0 if top_k == -1 else top_k,
            top_p=float(params.get("top_p", 1.0)),
            min_p=float(params.get("min_p", 0.0)),
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            frequency_penalty=float(params.get("frequency_penalty", 0.0)),
            presence_penalty=float(params.get("presence_penalty", 0.0)),
            stop=params.get("stop", []),
            seed=params.get("seed"),
        )
    except ConfigError as e:
        name = str(e).split("=", 1)[0]
        param = max_key if name == "max_new_tokens" else ENGINE_NAMES.get(name)
        raise ApiError(400, f"'{param}': {str(e).split('=', 1)[-1]}"[:300], param=param) from None


def prompt_list(prompt: str | list, vocab_size: int) -> list[str | list[int]]:
    """``prompt`` of /v1/completions (its shape checked by ``CompletionRequest``) as a list: each a
    string or a list of token ids."""
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"'prompt' holds a token id outside [0, {vocab_size})", param="prompt")
    return prompts


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages (their shape checked by ``ChatRequest``) as the chat template's: text parts
    joined, the role developer as system, tool calls and their ids kept; the roles and their order are
    the template's to check."""
    text = lambda content: content if content is None or isinstance(content, str) else "".join(
        p["text"] for p in content)  # fmt: skip
    out = []
    for m in messages:
        one = {"role": "system" if m["role"] == "developer" else m["role"], "content": text(m.get("content"))}
        out.append(one | {k: m[k] for k in ("tool_calls", "tool_call_id") if m.get(k) not in (None, [])})
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
