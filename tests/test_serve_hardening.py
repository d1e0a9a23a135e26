"""The server hardened as local model servers are, and never a 500 (issue 26, items 5, 6 and 9):
POST bodies only as application/json (415), the Host header checked (403: DNS rebinding), no CORS
unless cors_origins lists origins; values outside the engine's ranges, characters the vocabulary
lacks, lone surrogates and absurd nesting are 400s counted in /metrics; more prompts than max_queue
is 400, not a 429 that can never succeed; a client leaving mid-upload prints no traceback; a
lowercase ``bearer`` is accepted; a taken port is one line; chat replies do not start with the
template's space."""

from __future__ import annotations

import json
import logging
import re
import socket
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers_serve import live_server  # noqa: E402

from gpt.commands.serve import run  # noqa: E402
from gpt.infer.config import ServeConfig  # noqa: E402
from gpt.serve.guard import host_allowed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Romeo?"}], "max_tokens": 5}
COMPLETION = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5}


@pytest.fixture(scope="module")
def server(served):
    cfg = ServeConfig(max_batch=4, max_queue=3, max_n=2, max_tokens=50, api_key="s3cret")
    with live_server(served.model, served.tokenizer, cfg, name="tiny") as s:
        yield s


def post(server, path: str, content: bytes | str, content_type: str | None = "application/json", **headers):
    headers = {"Authorization": "Bearer s3cret", **headers}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def errors_counted(server, status: int) -> int:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf'gpt_request_errors_total{{status="{status}"}} (\d+)', text)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])  # fmt: skip
def test_a_body_not_sent_as_json_is_415(server, content_type):
    before = errors_counted(server, 415)
    body = error(post(server, "/v1/completions", '{"model": "tiny", "prompt": "ROMEO:"}', content_type), 415)
    assert body["code"] == "unsupported_media_type" and "application/json" in body["message"]
    assert errors_counted(server, 415) == before + 1
    ok = post(server, "/v1/completions", '{"model": "tiny", "prompt": "RO", "max_tokens": 2}',
              "Application/JSON; charset=utf-8")  # fmt: skip
    assert ok.status_code == 200


def test_a_host_that_is_not_this_server_is_403(server):
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"localhost:{port + 1}", f"127.0.0.1.evil:{port}"):
        body = error(httpx.get(server.url + "/health", headers={"Host": host}), 403)
        assert body["code"] == "host_not_allowed" and "allowed_hosts" in body["message"]
        error(post(server, "/v1/completions", "{}", Host=host), 403)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200
    # the bound address and loopback names; allowed_hosts widens it (any port), "*" opens it
    assert host_allowed(f"[::1]:{port}", ("127.0.0.1", port), [])
    assert host_allowed("10.0.0.5:8000", ("10.0.0.5", 8000), [])
    assert not host_allowed("10.0.0.6:8000", ("10.0.0.5", 8000), [])
    assert host_allowed("my.box:443", ("127.0.0.1", 8000), ["my.box"])
    assert host_allowed("anything", ("127.0.0.1", 8000), ["*"])
    assert not host_allowed("", ("127.0.0.1", 8000), [])


def test_allowed_hosts_and_cors_origins(served):
    cfg = ServeConfig(allowed_hosts=["my.box"], cors_origins=["http://app.example"])
    with live_server(served.model, served.tokenizer, cfg, name="tiny") as s:
        assert httpx.get(s.url + "/health", headers={"Host": "my.box"}).status_code == 200
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}  # fmt: skip
        r = httpx.options(s.url + "/v1/completions", headers=preflight)
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        r = httpx.options(s.url + "/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_no_cors_headers_by_default(server):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/completions", headers=preflight)
    assert r.status_code in (404, 405) and not any(k.startswith("access-control") for k in r.headers)
    r = httpx.get(server.url + "/health", headers={"Origin": "http://evil.example"})
    assert not any(k.startswith("access-control") for k in r.headers)


MALFORMED = [
    ("/v1/completions", {**COMPLETION, "stop": ""}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", ""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": ""}, "stop"),
    ("/v1/completions", {**COMPLETION, "repetition_penalty": 1e-9}, "repetition_penalty"),  # engine: >= 1e-6
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 1e-9}, "repetition_penalty"),
    ("/v1/completions", {**COMPLETION, "top_k": -2}, "top_k"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 1e5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "Zebra"}]},
        "messages",
    ),  # 'Z' is not in the vocabulary
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "Ay \ud800"}]},
        "messages",
    ),  # a lone surrogate
    ("/v1/completions", {**COMPLETION, "prompt": "Ay \udfff"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, "model"),  # 404, its message escaped
]


@pytest.mark.parametrize("path, body, param", MALFORMED)
def test_malformed_values_are_4xx_naming_the_field_and_counted(server, path, body, param):
    status = 404 if param == "model" else 400
    before = errors_counted(server, status)
    r = post(server, path, json.dumps(body))  # ensure_ascii: lone surrogates travel as \ud800 escapes
    assert error(r, status)["param"] == param
    assert errors_counted(server, status) == before + 1


ABSURD = ["[" * 100_000, '{"a":' * 50_000, '{"model": "tiny", "temperature": 1e999}',
          '{"model": "tiny", "prompt": "x", "max_tokens": 1e999}']  # fmt: skip


@pytest.mark.parametrize("content", ABSURD)
def test_absurd_json_is_400(server, content):
    error(post(server, "/v1/completions", content), 400)
    assert httpx.get(server.url + "/health").status_code == 200


def test_more_prompts_than_max_queue_is_400_naming_the_limit(server):
    four = json.dumps({"model": "tiny", "prompt": ["RO"] * 4, "max_tokens": 1})
    body = error(post(server, "/v1/completions", four), 400)
    assert "max_queue" in body["message"] and "3" in body["message"] and body["param"] == "prompt"
    ok = post(server, "/v1/completions", '{"model": "tiny", "prompt": ["RO", "RO", "RO"], "max_tokens": 1}')
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3


def test_the_engines_whole_seed_range_works(server):
    r = post(server, "/v1/completions", f'{{"model": "tiny", "prompt": "RO", "n": 2, "seed": {2**64 - 1}}}')
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = post(server, "/v1/completions", '{"model": "tiny", "prompt": "RO", "max_tokens": 1}',
                 Authorization=f"{scheme} s3cret")  # fmt: skip
        assert r.status_code == 200, scheme
    error(post(server, "/v1/completions", "{}", Authorization="Basic s3cret"), 401)
    error(post(server, "/v1/completions", "{}", Authorization="bearer s3cre"), 401)


def test_a_client_leaving_mid_upload_prints_no_traceback(server):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                             b"application/json\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000\r\n"
                             b"\r\n{\"model\": " % server.port)  # fmt: skip
                time.sleep(0.1)
        time.sleep(0.5)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


def test_chat_replies_do_not_start_with_the_templates_space(server):
    r = post(server, "/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": '
             '"Who is Romeo?"}], "temperature": 0, "max_tokens": 20, "logprobs": true}')  # fmt: skip
    choice = r.json()["choices"][0]
    content, tokens = choice["message"]["content"], [t["token"] for t in choice["logprobs"]["content"]]
    assert content and not content.startswith(" ") and "".join(tokens) == " " + content
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                      json={**CHAT, "temperature": 0, "max_tokens": 20, "stream": True}) as s:  # fmt: skip
        lines = [line[6:] for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines]
    assert "".join(deltas) == content


def test_a_taken_port_is_one_line_before_the_server_claims_to_be_up(serve_run, capsys):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            run([f"ckpt={serve_run}", f"port={port}", "device=cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"port={port}" in err and "another port" in err
    assert "open http" not in err
