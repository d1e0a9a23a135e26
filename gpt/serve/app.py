"""The HTTP server: OpenAI's routes over the continuous batcher, the chat page, health and metrics.

    app = create_app(model, tokenizer, ServeConfig(), model_name="shakespeare_char")
    uvicorn.run(app, host="127.0.0.1", port=8000)         # what ``gpt serve`` does

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers server-sent events ending with ``data: [DONE]``), ``GET /health``, ``GET /metrics``
(Prometheus text) and ``GET /`` (the chat page, ``static/chat.html``). Errors are OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with 400 (a bad field, named), 401 (api_key),
403 (a Host that is not this server's: ``gpt.serve.guard``), 404 (unknown model or route), 413 (body
too large), 415 (a body not sent as application/json) or 429 (queue full), each counted in /metrics.
A streaming client that disconnects is cancelled at once: its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gpt.chat_template import check_messages, render_prompt
from gpt.errors import DataError
from gpt.infer.config import ServeConfig
from gpt.infer.engine import compile_decode
from gpt.infer.speculative import ModelDrafter, drafter_from
from gpt.model import GPT
from gpt.serve.batcher import Batcher, Done, Finish, Piece, QueueFull, Request
from gpt.serve.guard import HostGuard, check_json, error_response
from gpt.serve.metrics import Counters, render_metrics
from gpt.serve.protocol import (
    ApiError,
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    envelope,
    generation_config,
    new_id,
    parse_request,
    prompt_list,
    usage,
)
from gpt.serve.stream import Job, sse, stream_chat, stream_completion
from gpt.serve.tools import ToolPlan, reply_message, tool_plan
from gpt.tokenizer import EOT_TURN

log = logging.getLogger("gpt.serve")
PAGE = Path(__file__).parent / "static" / "chat.html"


class Service:
    """The state behind the routes: the model, its batcher, the limits and the counters."""

    def __init__(self, model: GPT, tokenizer, cfg: ServeConfig, model_name: str, chat_trained: bool):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.model_name, self.chat_trained = model_name, chat_trained
        self.block_size = model.config.block_size
        drafter = None if cfg.draft is None else drafter_from(
            cfg.draft, cfg.draft_tokens, cfg.draft_ngram, model, tokenizer
        )  # ngram, or a draft model loaded now (a bad reference stops the server before it listens)
        if cfg.compile and isinstance(drafter, ModelDrafter):  # drafts are checked eagerly: exact text
            compile_decode(drafter.model)
        self.batcher = Batcher(model, tokenizer, cfg.max_batch, cfg.max_queue, drafter=drafter)
        self.counters = Counters()
        self.created = int(time.time())

    # ---------------------------------------------------------------------------------- checks
    def check_auth(self, request) -> None:
        if self.cfg.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        ok = scheme.lower() == "bearer"  # RFC 7235: the scheme is case-insensitive
        if not (hmac.compare_digest(given.strip().encode(), self.cfg.api_key.encode()) and ok):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip

    async def read_body(self, request) -> Any:
        """The JSON body, read up to max_body_bytes (413 beyond, 415 if not declared JSON, 400 if
        not JSON or if the client left during the upload: nobody reads that answer)."""
        self.check_auth(request)
        check_json(request.headers.get("content-type"))
        limit, length = self.cfg.max_body_bytes, request.headers.get("content-length") or "0"
        if not length.isdigit() or int(length) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before the whole body arrived") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]})") from None

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
        except (DataError, UnicodeEncodeError) as e:  # a character the vocabulary lacks, a lone surrogate
            raise ApiError(400, f"'{param}': {str(e)[:200]}", param=param) from None

    def submit(self, job: Job, prompts: list[list[int]], params: dict[str, Any], max_new: int,
               stop_ids: frozenset[int], logprobs: int | None, max_key: str, plan: ToolPlan | None = None
               ) -> None:  # fmt: skip
        config = generation_config(params, max_new, max_key)  # the engine's checks: 400 naming the field
        if len(prompts) > self.cfg.max_queue:  # 429 would say "try again", which can never work
            raise ApiError(400, f"{len(prompts)} prompts in one request; this server queues at most "
                           f"{self.cfg.max_queue} (max_queue)", param="prompt")  # fmt: skip
        for i, ids in enumerate(prompts):
            req = Request(ids, config, params.get("n", 1), job.emitter(i), stop_ids, logprobs)
            if plan is not None:  # a call's opening forced, tool_choice none's ban, its end a stop token
                req.prefix, req.banned, req.stop_token_ids = plan.prefix, plan.banned, stop_ids | plan.stops
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
    if cfg.cors_origins:  # none by default: no page of another origin may read the answers
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(HostGuard, allowed_hosts=cfg.allowed_hosts, counters=service.counters)  # outermost

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):  # every error as OpenAI's body, counted by status
        return error_response(e, service.counters)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return error_response(ApiError(e.status_code, str(e.detail), code=code), service.counters)

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
    params = parse_request(await service.read_body(request), chat)
    service.check_model(params)
    required, tok, plan = "messages" if chat else "prompt", service.tokenizer, None
    if required not in params:
        raise ApiError(400, f"'{required}' is required", param=required)
    if chat:
        messages = chat_messages(params["messages"])
        problems = check_messages(messages, final_role="user")
        if problems:
            index, text = problems[0]
            raise ApiError(400, f"messages[{index}]: {text}", param="messages")
        plan = tool_plan(params, tok)
        shown = plan.tools if plan is not None and plan.choice != "none" else None
        prompts = [chat_prompt(tok, messages, shown)]
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
    job = Job(asyncio.get_running_loop())
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in params else "max_tokens"
    service.submit(job, prompts, params, max_new, stop_ids, logprobs, max_key, plan)
    service.counters.requests["chat" if chat else "completions"] += 1
    echo = [tok.decode(p) if params.get("echo") else "" for p in prompts]  # chat: never echoed
    if params.get("stream"):
        chunks = stream_chat(service, job, params, plan) if chat else stream_completion(service, job, params,
                                                                                         echo)  # fmt: skip
        return sse(chunks, service, job)
    kind = "chat.completion" if chat else "text_completion"
    return await respond(request, service, job, kind, params, echo, plan)


def chat_prompt(tokenizer, messages: list[dict[str, Any]], tools: list | None = None) -> list[int]:
    """The chat template's prompt; 400 for a character the vocabulary lacks, a lone surrogate, or tool
    calls sent to a model without tool-call tokens."""
    try:
        return render_prompt(tokenizer, messages, tools)
    except (DataError, UnicodeEncodeError) as e:
        raise ApiError(400, f"'messages': {str(e)[:200]}", param="messages") from None


async def respond(request, service: Service, job: Job, kind: str, params: dict[str, Any], echo: list[str],
                  plan: ToolPlan | None = None):  # fmt: skip
    """Wait for every choice of a non-streamed request (cancelling it if the client goes away)."""
    n = params.get("n", 1)
    texts = {i: "" for i in range(len(job.requests) * n)}
    entries: dict[int, list] = {i: [] for i in texts}
    finishes: dict[int, Finish] = {}
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
                finishes[slot] = event
    finally:
        service.cancel(job)
    choices = []
    for slot, text in texts.items():
        finish, prefix = finishes.get(slot, Finish(slot, "length")), echo[slot // n]
        reason = finish.finish_reason
        if kind == "chat.completion":
            lp = chat_logprobs(service.tokenizer, entries[slot]) if params.get("logprobs") else None
            # the space after "Assistant:" opens the reply's first token; the reply is shown as written
            text = text.removeprefix(" ") if service.tokenizer.chat_template is None else text
            message = {"role": "assistant", "content": text}
            if plan is not None:
                message, reason = reply_message(plan, service.tokenizer, text, finish)
            choices.append({"index": slot, "message": message, "logprobs": lp, "finish_reason": reason})
        else:
            lp = (completion_logprobs(service.tokenizer, entries[slot], len(prefix))
                  if params.get("logprobs") is not None else None)  # fmt: skip
            choices.append({"index": slot, "text": prefix + text, "logprobs": lp, "finish_reason": reason})
    response = envelope(kind, new_id("chatcmpl" if kind == "chat.completion" else "cmpl"),
                        service.model_name, choices)  # fmt: skip
    response["usage"] = usage(prompt_tokens, completion_tokens)
    return response
