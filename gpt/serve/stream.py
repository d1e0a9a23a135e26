"""Streamed answers: the server-sent events of /v1/completions and /v1/chat/completions, and the
``Job`` whose events (from the model thread) both streamed and whole answers read.

    job = Job(asyncio.get_running_loop())       # its requests' emitters put events in one queue
    return sse(stream_chat(service, job, params), service, job)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from gpt.serve.batcher import Done, Failed, Finish, Piece, Request
from gpt.serve.protocol import ApiError, chat_logprobs, completion_logprobs, envelope, new_id, usage
from gpt.serve.tools import ReplySplitter, ToolPlan


class Job:
    """The batcher requests of one HTTP request; their events meet in one asyncio queue as
    (request index, event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.requests: list[Request] = []

    def emitter(self, index: int):
        def emit(event: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return emit

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """Every event until each request is done; ApiError(500) if one failed."""
        left = len(self.requests)
        while left:
            index, event = await self.queue.get()
            if isinstance(event, Failed):
                raise ApiError(500, event.message, kind="server_error")
            if isinstance(event, Done):
                left -= 1
            yield index, event


def sse(chunks: AsyncIterator[dict[str, Any]], service: Any, job: Job) -> StreamingResponse:
    """Server-sent events of ``chunks``, then ``data: [DONE]``; the job is cancelled at the end."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:  # also when the client disconnects: the stream is cancelled here
            service.cancel(job)
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


async def stream_completion(service: Any, job: Job, params, echo: list[str]) -> AsyncIterator[dict]:
    n, rid, created = params.get("n", 1), new_id("cmpl"), int(time.time())
    offsets = {}
    chunk = lambda slot, text, lp=None, reason=None: envelope("text_completion", rid, service.model_name, [
        {"index": slot, "text": text, "logprobs": lp, "finish_reason": reason}], created)  # fmt: skip
    for i, prefix in enumerate(echo):
        for c in range(n):
            offsets[i * n + c] = len(prefix)
            if prefix:
                yield chunk(i * n + c, prefix)
    async for index, event in _with_usage(job, params):
        if isinstance(event, dict):
            yield envelope("text_completion", rid, service.model_name, [], created) | {"usage": event}
            continue
        slot = index * n + event.choice
        if isinstance(event, Piece):
            lp = (completion_logprobs(service.tokenizer, event.logprobs, offsets[slot])
                  if params.get("logprobs") is not None else None)  # fmt: skip
            offsets[slot] += len(event.text)
            yield chunk(slot, event.text, lp)
        elif isinstance(event, Finish):
            yield chunk(slot, "", None, event.finish_reason)


async def stream_chat(service: Any, job: Job, params, plan: ToolPlan | None = None) -> AsyncIterator[dict]:
    """Content deltas; with tools, a choice's content until a call opens, then (at its end) the call as
    tool_calls deltas and finish_reason "tool_calls", or the held text if it is no valid call."""
    n, rid, created = params.get("n", 1), new_id("chatcmpl"), int(time.time())
    splitters = {c: ReplySplitter(plan) for c in range(n)} if plan is not None else {}
    name = service.model_name
    chunk = lambda slot, delta, lp=None, reason=None: envelope("chat.completion.chunk", rid, name, [
        {"index": slot, "delta": delta, "logprobs": lp, "finish_reason": reason}], created)  # fmt: skip
    for c in range(n):
        yield chunk(c, {"role": "assistant", "content": ""})
    # choices whose reply has begun: the first text loses the space after "Assistant:" (as respond's)
    begun = set() if service.tokenizer.chat_template is None else set(range(n))
    async for _, event in _with_usage(job, params):
        if isinstance(event, dict):
            yield envelope("chat.completion.chunk", rid, service.model_name, [], created) | {"usage": event}
        elif isinstance(event, Piece):
            lp = chat_logprobs(service.tokenizer, event.logprobs) if params.get("logprobs") else None
            text = event.text if event.choice in begun else event.text.removeprefix(" ")
            begun.update([event.choice] if event.text else [])
            text = splitters[event.choice].push(text) if splitters else text
            if text or lp is not None or not splitters:
                yield chunk(event.choice, {"content": text}, lp)
        elif isinstance(event, Finish):
            deltas, reason = (splitters[event.choice].finish(service.tokenizer, event) if splitters
                              else ([], event.finish_reason))  # fmt: skip
            for delta in deltas:
                yield chunk(event.choice, delta)
            yield chunk(event.choice, {}, None, reason)


async def _with_usage(job: Job, params) -> AsyncIterator[tuple[int, Any]]:
    """The job's events; with ``stream_options.include_usage``, then the usage (a dict) last."""
    prompt_tokens = completion_tokens = 0
    async for index, event in job.events():
        if isinstance(event, Done):
            prompt_tokens += event.prompt_tokens
            completion_tokens += event.completion_tokens
        else:
            yield index, event
    if (params.get("stream_options") or {}).get("include_usage"):
        yield -1, usage(prompt_tokens, completion_tokens)
