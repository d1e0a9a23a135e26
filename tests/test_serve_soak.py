"""The soak test of the server (slow tier, loopback only, bounded): the real ``gpt serve`` process
answers 2,000 requests that mix streams and non-streams, ``n`` > 1, logprobs, clients that hang up
mid-stream and clients that read slowly, a bounded number at a time. Every request gets a complete
reply or a clean 4xx error (none lost, never a 5xx), the server's resident memory grows less than 5%
over the last half, and SIGTERM lets the requests in flight finish, then the process exits 0.

    pytest -m slow tests/test_serve_soak.py -s        # -s prints the figures (docs/benchmarks.md)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers_serve import free_port, tiny_run  # noqa: E402

from gpt.typed_config import REPO_ROOT  # noqa: E402

REQUESTS = int(os.environ.get("SOAK_REQUESTS", 2000))
CONCURRENCY = 16  # clients at a time: below max_queue, so that 429 stays the exception it should be
KINDS = ("complete", "complete_stream", "chat", "chat_stream", "n", "logprobs", "chat_logprobs",
         "hang_up", "slow_reader")  # fmt: skip
CHAT = [{"role": "user", "content": "Who is Romeo?"}]


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS) in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def peak_rss_kib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")).split()[1])  # fmt: skip


def request_body(kind: str, rnd: random.Random) -> tuple[str, dict]:
    """(path, JSON body) of one request of ``kind``; short replies keep 2,000 of them to minutes."""
    tokens = rnd.randint(4, 16)
    if kind.startswith("chat"):
        body = {"model": "tiny", "messages": CHAT, "max_tokens": tokens, "temperature": 1.0}
        body |= {"stream": True} if kind == "chat_stream" else {}
        body |= {"logprobs": True, "top_logprobs": 2} if kind == "chat_logprobs" else {}
        return "/v1/chat/completions", body
    body = {"model": "tiny", "prompt": rnd.choice(["ROMEO:", "w", "JULIET: Ay"]), "max_tokens": tokens,
            "temperature": rnd.choice([0.0, 0.8, 1.0])}  # fmt: skip
    body |= {"stream": True} if kind in ("complete_stream", "hang_up", "slow_reader") else {}
    body |= {"n": 3} if kind == "n" else {}
    body |= {"logprobs": 2} if kind == "logprobs" else {}
    body |= {"max_tokens": 100, "temperature": 1.0} if kind == "hang_up" else {}  # gone long before the end
    return "/v1/completions", body


def check_reply(kind: str, body: dict, data: dict) -> None:
    """A whole non-streamed reply: every choice finished, logprobs where asked."""
    choices = data["choices"]
    assert len(choices) == body.get("n", 1) and all(c["finish_reason"] in ("stop", "length") for c in choices)
    if kind == "logprobs":
        assert all(len(c["logprobs"]["tokens"]) == len(c["logprobs"]["top_logprobs"]) for c in choices)
    if kind == "chat_logprobs":
        assert all(c["logprobs"]["content"] for c in choices if c["message"]["content"])


async def one(client: httpx.AsyncClient, i: int, outcomes: Counter) -> None:
    """Request ``i``; its outcome is counted: complete, hung_up (by us, on purpose) or 4xx."""
    rnd = random.Random(i)
    kind = KINDS[i % len(KINDS)]
    path, body = request_body(kind, rnd)
    if not body.get("stream"):
        response = await client.post(path, json=body)
        assert response.status_code < 500, f"request {i} ({kind}): {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert response.json()["error"]["message"], response.text  # a clean OpenAI error body
            outcomes[f"{response.status_code}"] += 1
            return
        check_reply(kind, body, response.json())
        outcomes["complete"] += 1
        return
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code < 500, f"request {i} ({kind}): {response.status_code}"
        if response.status_code >= 400:
            assert json.loads(await response.aread())["error"]["message"]
            outcomes[f"{response.status_code}"] += 1
            return
        lines = []
        async for line in response.aiter_lines():
            if not line:
                continue
            lines.append(line)
            if kind == "hang_up" and len(lines) == 2:
                outcomes["hung_up"] += 1
                return  # leaving the block closes the connection mid-stream
            if kind == "slow_reader":
                await asyncio.sleep(0.02)
    assert lines[-1] == "data: [DONE]", f"request {i} ({kind}) ended without [DONE]: {lines[-3:]}"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][-1]["finish_reason"] in ("stop", "length"), lines[-2]
    outcomes["complete"] += 1


async def soak(url: str, pid: int) -> tuple[Counter, list[int]]:
    """Every request, CONCURRENCY at a time; the server's RSS after each 100 answered."""
    outcomes: Counter = Counter()
    samples: list[int] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def bounded(client, i):
        nonlocal done
        async with gate:
            await one(client, i, outcomes)
        done += 1
        if done % 100 == 0:
            samples.append(rss_kib(pid))

    limits = httpx.Limits(max_connections=CONCURRENCY + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(bounded(client, i) for i in range(REQUESTS)))
    return outcomes, samples


def start_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpt", "serve", f"ckpt={run_dir}", f"port={port}",
                             "device=cpu", "dtype=fp32", "log_level=warning", "max_batch=16"],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)


def drain_on_sigterm(proc: subprocess.Popen, url: str) -> None:
    """Four streams in flight, SIGTERM after the first chunk of each: all four end with [DONE]."""

    async def go():
        body = {"model": "tiny", "prompt": "w", "max_tokens": 60, "temperature": 1.0, "stream": True}
        started = asyncio.Event()
        count = 0

        async def stream(client):
            nonlocal count
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = []
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 1:
                        count += 1
                        if count == 4:
                            started.set()
                    await asyncio.sleep(0.05)  # a slow reader: SIGTERM comes while it still reads
                return lines

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(4)]
            await asyncio.wait_for(started.wait(), 30)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    for lines in asyncio.run(go()):
        assert lines[-1] == "data: [DONE]", lines[-3:]


@pytest.mark.slow  # about a minute or two on 2 busy cores
def test_2000_mixed_requests_lose_nothing_leak_nothing_and_sigterm_drains(tmp_path, one_thread):
    run_dir = tiny_run(tmp_path / "tiny", steps=50)  # replies need not be good: max_tokens ends them
    proc, url = start_server(run_dir)
    try:
        start = time.monotonic()
        outcomes, samples = asyncio.run(soak(url, proc.pid))
        wall = time.monotonic() - start
        assert sum(outcomes.values()) == REQUESTS, outcomes  # every request accounted for
        assert set(outcomes) <= {"complete", "hung_up", "429"}, outcomes
        assert outcomes["hung_up"] == sum(KINDS[i % len(KINDS)] == "hang_up" for i in range(REQUESTS))
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok"
        metrics = httpx.get(url + "/metrics").text
        assert "gpt_batch_occupancy 0" in metrics and "gpt_queue_depth 0" in metrics
        half = samples[len(samples) // 2 - 1]  # after the first half of the requests
        growth = (max(samples[len(samples) // 2 :]) - half) / half
        peak = peak_rss_kib(proc.pid)
        print(
            f"\nsoak: {REQUESTS} requests in {wall:.1f} s, outcomes {dict(outcomes)}, RSS at half "
            f"{half / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, last-half growth {growth:+.2%}"
        )
        assert growth < 0.05, f"RSS grew {growth:.1%} over the last half: {samples}"
        drain_on_sigterm(proc, url)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
