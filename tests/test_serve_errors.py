"""The server's limits and faults: every bad request gets its status and OpenAI's error body naming the
field, a full queue answers 429, the API key and the body size are enforced, clients that vanish
mid-stream free their rows (nothing leaks), and SIGTERM lets a running stream finish, then exits 0."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers_serve import free_port, live_server  # noqa: E402

from gpt.commands.serve import run  # noqa: E402
from gpt.infer.config import ServeConfig  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.serve.server import is_loopback  # noqa: E402
from gpt.typed_config import REPO_ROOT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Romeo?"}], "max_tokens": 5}
COMPLETION = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5}


@pytest.fixture(scope="module")
def server(served):
    cfg = ServeConfig(max_batch=8, max_queue=64, max_n=4, max_tokens=100, max_body_bytes=4096)
    with live_server(served.model, served.tokenizer, cfg, name="tiny") as s:
        yield s


def error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param
    return body


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),  # the engine's range
        ("/v1/completions", {**COMPLETION, "n": "3"}, "n"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "stop": 5}, "stop"),
        ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
        ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
        ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed"),
        ("/v1/completions", {**COMPLETION, "logprobs": 9}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "prompt": [[1, 2], 3]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [10**6]}, "prompt"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {**COMPLETION, "prompt": "Zebra"}, "prompt"),  # 'Z' is not in the vocabulary
        ("/v1/completions", {**COMPLETION, "n": 5}, "n"),  # beyond max_n=4
        ("/v1/completions", {**COMPLETION, "max_tokens": 101}, "max_tokens"),  # beyond max_tokens=100
        ("/v1/completions", {**COMPLETION, "prompt": "soft " * 30}, "prompt"),  # longer than the context
        ("/v1/completions", {**COMPLETION, "prompt": "soft " * 20, "max_tokens": 50}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "extra": 1, "top_k": "many"}, "top_k"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ],
)
def test_a_bad_field_is_400_naming_it(server, path, body, param):
    body = error(httpx.post(server.url + path, json=body), 400, param)
    assert body["type"] == "invalid_request_error"


def test_bad_json_and_a_body_that_is_not_an_object(server):
    for content in (b"{not json", b"[1, 2]", "\u00e9".encode("latin-1")):
        r = httpx.post(
            server.url + "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        error(r, 400)


def test_nan_is_not_a_temperature(server):
    content = b'{"model": "tiny", "prompt": "x", "temperature": NaN}'
    r = httpx.post(
        server.url + "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    error(r, 400, "temperature")


def test_context_error_has_its_code(server):
    r = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": "soft " * 30})
    assert error(r, 400, "prompt")["code"] == "context_length_exceeded"


def test_unknown_model_and_route_are_404(server):
    assert (
        error(
            httpx.post(server.url + "/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404, "model"
        )["code"]
        == "model_not_found"
    )
    error(httpx.get(server.url + "/v1/nothing"), 404)
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_body_size_limit_is_413(server):
    r = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "user": "x" * 5000})
    error(r, 413)


def test_queue_full_is_429(served):
    cfg = ServeConfig(max_batch=1, max_queue=1, max_n=1)
    with live_server(served.model, served.tokenizer, cfg, name="tiny") as server:
        server.service.batcher.pause()  # nothing is admitted: the first request waits in the queue

        async def go():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
                while server.service.batcher.queue_depth < 1:
                    await asyncio.sleep(0.01)
                second = await client.post("/v1/completions", json=COMPLETION)
                server.service.batcher.resume()
                return await first, second

        first, second = asyncio.run(go())
        assert first.status_code == 200
        assert error(second, 429)["code"] == "queue_full"
        assert 'gpt_request_errors_total{status="429"} 1' in httpx.get(server.url + "/metrics").text


def test_api_key_is_required_when_set(served):
    with live_server(served.model, served.tokenizer, ServeConfig(api_key="s3cret"), name="tiny") as server:
        error(httpx.post(server.url + "/v1/completions", json=COMPLETION), 401)
        wrong = {"Authorization": "Bearer nope"}
        error(httpx.post(server.url + "/v1/completions", json=COMPLETION, headers=wrong), 401)
        error(httpx.get(server.url + "/v1/models"), 401)
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.post(server.url + "/v1/completions", json=COMPLETION, headers=right).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def long_server(served):
    """The tiny model with a context of 1024 (rotary positions: the same weights), so that a stream
    can ask for far more tokens than the time its client takes to hang up."""
    model = GPT(dataclasses.replace(served.model.config, block_size=1024))
    model.load_state_dict(served.model.state_dict())
    with live_server(model, served.tokenizer, ServeConfig(max_batch=16, max_queue=64), name="tiny") as s:
        yield s


def test_half_of_64_streams_disconnect_and_nothing_leaks(long_server):
    """64 concurrent streams; 32 hang up after their first chunk. /health keeps answering while they
    run, the other 32 finish whole, the 32 stop being decoded (far fewer tokens than asked) and the
    batch is empty afterwards."""
    server = long_server
    stats = server.service.batcher.stats
    before = stats.completion_tokens
    long_body = {**COMPLETION, "prompt": "w", "max_tokens": 1000, "stream": True, "temperature": 1.0}
    short_body = {**COMPLETION, "prompt": "w", "max_tokens": 20, "stream": True, "temperature": 0}

    async def stream(client, i):
        body = long_body if i % 2 else short_body
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = []
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if i % 2 and len(lines) == 1:
                    return None  # hang up mid-stream
            return lines

    async def health_checks(client, done):
        answered = 0
        while not done.is_set():
            assert (await client.get("/health")).status_code == 200
            answered += 1
            await asyncio.sleep(0.05)
        return answered

    async def go():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            done = asyncio.Event()
            checks = asyncio.create_task(health_checks(client, done))
            results = await asyncio.gather(*(stream(client, i) for i in range(64)))
            done.set()
            return results, await checks

    results, answered = asyncio.run(go())
    assert answered >= 1
    for lines in results[0::2]:
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    deadline = time.monotonic() + 10
    while server.service.batcher.occupancy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.service.batcher.occupancy == 0 and server.service.batcher.queue_depth == 0
    assert server.service.batcher.decoder.rows == 0
    generated = stats.completion_tokens - before
    assert generated >= 32 * 20 and generated < 32 * 20 + 32 * 1000 // 4, "the hung-up streams were stopped"
    assert "gpt_batch_occupancy 0" in httpx.get(server.url + "/metrics").text


def test_loopback_check():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_sigterm_lets_the_stream_finish_and_exits_0(serve_run):
    """The command itself: gpt serve starts, streams, and on SIGTERM finishes the running
    stream before exiting with status 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt",
            "serve",
            f"ckpt={serve_run}",
            f"port={port}",
            "device=cpu",
            "log_level=warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        body = {**COMPLETION, "max_tokens": 100, "stream": True, "temperature": 1.0, "prompt": "w"}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert '"finish_reason"' in rest[-2] and '"finish_reason": null' not in rest[-2]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_chat_request_to_a_model_without_chat_training_warns(served, caplog):
    with (
        live_server(served.model, served.tokenizer, ServeConfig(), name="tiny", chat_trained=False) as server,
        caplog.at_level("WARNING", logger="gpt.serve"),
    ):
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        assert httpx.post(server.url + "/v1/completions", json=COMPLETION).status_code == 200
    warnings = [rec for rec in caplog.records if "without chat training" in rec.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_gpt_serve_composes_every_key_of_serve_config_documented():
    from gpt.commands.cli import compose_config, field_docs
    from gpt.commands.serve import COMMAND

    cfg, _ = compose_config(COMMAND, [])
    keys = list(cfg)
    assert keys == [f.name for f in dataclasses.fields(ServeConfig)]
    assert ServeConfig.from_dict(cfg) == ServeConfig()
    docs = field_docs(ServeConfig)
    assert [key for key in keys if not docs.get(key)] == []


def test_a_bad_setting_is_one_line_and_exit_2(capsys):
    for argv, says in (
        (["port=99999"], "port=99999"),
        (["ckpt=/no/such/run"], "no checkpoint at"),
        (["max_batch=0"], "max_batch=0"),
        (["bogus=1"], "unknown config key 'bogus'"),
    ):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err
    assert ServeConfig(max_batch=2).max_n == 2
