"""What a local server checks before any route runs, and how every error leaves it.

A web page the user visits may send requests to a server on the user's machine: a form or a
``fetch`` with ``Content-Type: text/plain`` is a CORS "simple request" that the browser sends without
asking (CSRF), and DNS rebinding points an attacker's name at 127.0.0.1 so that the page may even read
the answers. So, as local model servers do:

- ``HostGuard`` (ASGI middleware) answers 403 unless the ``Host`` header names this server: the
  address the connection came to, ``localhost``, ``127.0.0.1`` or ``[::1]`` with the server's port,
  or a name of ``ServeConfig.allowed_hosts`` (any port; ``*`` = any host);
- ``check_json`` answers 415 unless a POST body is ``application/json`` (no simple request can send it);
- CORS headers are sent only for the origins of ``ServeConfig.cors_origins`` (none by default).

``error_response`` renders every error as OpenAI's body and counts it by status for ``/metrics``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from gpt.serve.metrics import Counters
from gpt.serve.protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def error_response(e: ApiError, counters: Counters) -> Response:
    """OpenAI's error body for ``e``, counted; ASCII-escaped JSON, so that a lone surrogate a client
    sent (echoed in a message) cannot break the encoding of the answer."""
    counters.errors[e.status] = counters.errors.get(e.status, 0) + 1
    return Response(json.dumps(e.body()), status_code=e.status, media_type="application/json")


def split_host(host: str) -> tuple[str, int | None]:
    """("name", port or None) of a Host header value: ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
    host = host.strip().lower()
    name, sep, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
    if not sep or not port.isdigit() or len(port) > 5:
        return host, None
    return name, int(port)


def host_allowed(host: str, server: tuple[str, int] | None, allowed: list[str]) -> bool:
    """Whether the Host header ``host`` names this server (``server``: the address the connection
    came to, as the ASGI scope gives it)."""
    if "*" in allowed:
        return True
    name, port = split_host(host)
    if name in (a.lower() for a in allowed):
        return True
    if server is None:
        return False
    bound, bound_port = str(server[0]).lower(), server[1]
    names = {*LOOPBACK_NAMES, f"[{bound}]" if ":" in bound else bound}
    return name in names and (port == bound_port or (port is None and bound_port == 80))


class HostGuard:
    """ASGI middleware: 403 with OpenAI's error body for a request whose Host is not this server's."""

    def __init__(self, app: Any, allowed_hosts: list[str], counters: Counters):
        self.app, self.allowed, self.counters = app, list(allowed_hosts), counters

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, scope.get("server"), self.allowed):
                message = (f"Host {host!r} is not this server's address (DNS rebinding?); to serve this "
                           "name, add it to allowed_hosts (gpt serve allowed_hosts=[NAME])")  # fmt: skip
                error = ApiError(403, message, code="host_not_allowed", kind="permission_error")
                await error_response(error, self.counters)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json(content_type: str | None) -> None:
    """415 unless the body is declared ``application/json`` (a charset parameter is fine)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json', got "
                            f"{content_type!r:.80}", code="unsupported_media_type")  # fmt: skip
