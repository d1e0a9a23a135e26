"""The HTTP server: OpenAI's routes over the continuous batcher, the chat page, health and metrics.

    app = create_app(model, tokenizer, ServeConfig(), model_name="shakespeare_char")
    uvicorn.run(app, host="127.0.0.1", port=8000)         # what ``gpt serve`` does

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers server-sent events ending with ``data: [DONE]``), ``GET /health``, ``GET /metrics``
(Prometheus text) and ``GET /`` (the chat page, ``static/chat.html``). Errors are OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with 400 (a bad field, named), 401 (api_key),
404 (unknown model or route), 413 (body too large) or 429 (queue full). A streaming client that
disconnects is cancelled at once: its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gpt.chat_template import check_messages, render_prompt
from gpt.errors import DataError
from gpt.infer.config import ServeConfig
from gpt.model import GPT
from gpt.serve.batcher import Batcher, Done, Failed, Finish, Piece, QueueFull, Request
from gpt.serve.metrics import Counters, render_metrics
from gpt.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    envelope,
    generation_config,
    new_id,
    parse_fields,
    prompt_list,
    usage,
)
from gpt.tokenizer import EOT_TURN

log = logging.getLogger("gpt.serve")
PAGE = Path(__file__).parent / "static" / "chat.html"


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


class Service:
    """The state behind the routes: the model, its batcher, the limits and the counters."""

    def __init__(self, model: GPT, tokenizer, cfg: ServeConfig, model_name: str, chat_trained: bool):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.model_name, self.chat_trained = model_name, chat_trained
        self.block_size = model.config.block_size
        self.batcher = Batcher(model, tokenizer, cfg.max_batch, cfg.max_queue)
        self.counters = Counters()
        self.created = int(time.time())

    # ---------------------------------------------------------------------------------- checks
    def check_auth(self, request) -> None:
        if self.cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip

    async def read_body(self, request) -> Any:
        """The JSON body, read up to max_body_bytes (413 beyond, 400 if not JSON)."""
        self.check_auth(request)
        limit = self.cfg.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def check_model(self, params: dict[str, Any]) -> None:
        name = params.get("model")
        if name is None:
            raise ApiError(400, "'model' is required", param="model")
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server has '{self.model_name}'",
                           param="model", code="model_not_found")  # fmt: skip

    def limits(self, params: dict[str, Any], prompt_len: int, key: str = "max_tokens") -> int:
        """max_new_tokens of a request after checking n, max_tokens and the prompt's length."""
        n = params.get("n", 1)
        if n > self.cfg.max_n:
            raise ApiError(400, f"'n' must be <= {self.cfg.max_n} on this server, got {n}", param="n")
        room = self.block_size - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                           f"{self.block_size}, which leaves no room for a reply", param="messages"
                           if key == "max_completion_tokens" else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        limit = self.cfg.max_tokens or self.block_size
        key = key if key in params else "max_tokens"
        asked = params.get(key)
        if asked is None:
            return min(limit, room)
        if asked > limit:
            raise ApiError(400, f"'{key}' must be <= {limit} on this server, got {asked}", param=key)
        if asked > room:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) plus '{key}' ({asked}) exceed this "
                           f"model's context of {self.block_size} tokens", param=key,
                           code="context_length_exceeded")  # fmt: skip
        return asked

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except DataError as e:
            raise ApiError(400, f"'{param}': {e}", param=param) from None

    def submit(self, job: Job, prompts: list[list[int]], params: dict[str, Any], max_new: int,
               stop_ids: frozenset[int], logprobs: int | None) -> None:  # fmt: skip
        for i, ids in enumerate(prompts):
            config = generation_config(params, max_new)
            req = Request(ids, config, params.get("n", 1), job.emitter(i), stop_ids, logprobs)
            try:
                self.batcher.submit(req)
            except QueueFull as e:
                for earlier in job.requests:
                    self.batcher.cancel(earlier)
                self.counters.rejected += 1
                raise ApiError(429, str(e), code="queue_full", kind="rate_limit_error") from None
            job.requests.append(req)

    def cancel(self, job: Job) -> None:
        for req in job.requests:
            self.batcher.cancel(req)


def create_app(model: GPT, tokenizer, cfg: ServeConfig, model_name: str, chat_trained: bool = True):
    """The ASGI app serving ``model`` under ``model_name`` with the limits of ``cfg``."""
    service = Service(model, tokenizer, cfg, model_name, chat_trained)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="gpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):  # every error as OpenAI's body, counted by status
        service.counters.errors[e.status] = service.counters.errors.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        body = ApiError(e.status_code, str(e.detail), code=code).body()
        return JSONResponse(body, status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "running": service.batcher.occupancy,
                "waiting": service.batcher.queue_depth}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(service), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        service.check_auth(request)
        card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "gpt",
                "max_model_len": service.block_size}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, service, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await complete(request, service, chat=True)

    return app


async def complete(request: HttpRequest, service: Service, chat: bool):
    """``POST /v1/completions``: one or several prompts (text or token ids), n choices each; or
    ``POST /v1/chat/completions`` (``chat``): the conversation rendered by the chat template, n replies."""
    params = parse_fields(await service.read_body(request), CHAT_FIELDS if chat else COMPLETION_FIELDS)
    service.check_model(params)
    required, tok = "messages" if chat else "prompt", service.tokenizer
    if required not in params:
        raise ApiError(400, f"'{required}' is required", param=required)
    if chat:
        messages = chat_messages(params["messages"])
        problems = check_messages(messages, final_role="user")
        if problems:
            index, text = problems[0]
            raise ApiError(400, f"messages[{index}]: {text}", param="messages")
        prompts = [render_prompt(tok, messages)]
        max_new = service.limits(params, len(prompts[0]), "max_completion_tokens")
        if not service.chat_trained:
            log.warning("chat request to %s, a model without chat training: its replies may not end "
                        "their turn or follow the conversation", service.model_name)  # fmt: skip
        stop_ids = frozenset([tok.special_id(EOT_TURN), tok.eot_id])
        logprobs = params.get("top_logprobs", 0) if params.get("logprobs") else None
    else:
        prompts = [p if isinstance(p, list) else service.encode(p, "prompt")
                   for p in prompt_list(params["prompt"], tok.vocab_size)]  # fmt: skip
        prompts = [p or [tok.eot_id] for p in prompts]  # "" continues <|endoftext|>
        max_new = min(service.limits(params, len(p)) for p in prompts)
        stop_ids, logprobs = frozenset([tok.eot_id]), params.get("logprobs")
    service.counters.requests["chat" if chat else "completions"] += 1
    job = Job(asyncio.get_running_loop())
    service.submit(job, prompts, params, max_new, stop_ids, logprobs)
    echo = [tok.decode(p) if params.get("echo") else "" for p in prompts]  # chat: never echoed
    if params.get("stream"):
        chunks = stream_chat(service, job, params) if chat else stream_completion(service, job, params, echo)
        return sse(chunks, service, job)
    kind = "chat.completion" if chat else "text_completion"
    return await respond(request, service, job, kind, params, echo)


def sse(chunks: AsyncIterator[dict[str, Any]], service: Service, job: Job) -> StreamingResponse:
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


async def respond(request, service: Service, job: Job, kind: str, params: dict[str, Any], echo: list[str]):
    """Wait for every choice of a non-streamed request (cancelling it if the client goes away)."""
    n = params.get("n", 1)
    texts = {i: "" for i in range(len(job.requests) * n)}
    entries: dict[int, list] = {i: [] for i in texts}
    reasons: dict[int, str] = {}
    prompt_tokens = completion_tokens = 0
    events = job.events().__aiter__()
    try:
        while True:
            next_event = asyncio.ensure_future(events.__anext__())
            while not next_event.done():
                await asyncio.wait([next_event], timeout=1.0)
                if not next_event.done() and await request.is_disconnected():
                    next_event.cancel()
                    service.cancel(job)
                    return None
            try:
                index, event = next_event.result()
            except StopAsyncIteration:
                break
            if isinstance(event, Done):
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
                continue
            slot = index * n + event.choice
            if isinstance(event, Piece):
                texts[slot] += event.text
                entries[slot] += event.logprobs
            elif isinstance(event, Finish):
                reasons[slot] = event.finish_reason
    finally:
        service.cancel(job)
    choices = []
    for slot, text in texts.items():
        reason, prefix = reasons.get(slot, "length"), echo[slot // n]
        if kind == "chat.completion":
            lp = chat_logprobs(service.tokenizer, entries[slot]) if params.get("logprobs") else None
            choices.append({"index": slot, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})  # fmt: skip
        else:
            lp = (completion_logprobs(service.tokenizer, entries[slot], len(prefix))
                  if params.get("logprobs") is not None else None)  # fmt: skip
            choices.append({"index": slot, "text": prefix + text, "logprobs": lp, "finish_reason": reason})
    response = envelope(kind, new_id("chatcmpl" if kind == "chat.completion" else "cmpl"),
                        service.model_name, choices)  # fmt: skip
    response["usage"] = usage(prompt_tokens, completion_tokens)
    return response


async def stream_completion(service: Service, job: Job, params, echo: list[str]) -> AsyncIterator[dict]:
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


async def stream_chat(service: Service, job: Job, params) -> AsyncIterator[dict]:
    n, rid, created = params.get("n", 1), new_id("chatcmpl"), int(time.time())
    name = service.model_name
    chunk = lambda slot, delta, lp=None, reason=None: envelope("chat.completion.chunk", rid, name, [
        {"index": slot, "delta": delta, "logprobs": lp, "finish_reason": reason}], created)  # fmt: skip
    for c in range(n):
        yield chunk(c, {"role": "assistant", "content": ""})
    async for _, event in _with_usage(job, params):
        if isinstance(event, dict):
            yield envelope("chat.completion.chunk", rid, service.model_name, [], created) | {"usage": event}
        elif isinstance(event, Piece):
            lp = chat_logprobs(service.tokenizer, event.logprobs) if params.get("logprobs") else None
            yield chunk(event.choice, {"content": event.text}, lp)
        elif isinstance(event, Finish):
            yield chunk(event.choice, {}, None, event.finish_reason)


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
