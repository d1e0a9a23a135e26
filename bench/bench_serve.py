"""Serving benchmark: N concurrent streaming clients against ``gpt.serve`` (continuous batching), for
the GPT-2-124M shape (random weights: speed does not depend on them) on this machine's CPU.

    python bench/bench_serve.py                              # N = 1, 4, 16; 16-token prompts, 48 new tokens
    python bench/bench_serve.py --clients 1 8 --new-tokens 64 --device cuda --dtype bf16
    python bench/bench_serve.py --model tiny --json results.jsonl
    python bench/bench_serve.py --ckpt out/wide --draft out/shakespeare_char --clients 1 --temperature 0

The server runs in this process (uvicorn on a free 127.0.0.1 port, the model on its own thread);
the clients are asyncio ``httpx`` streams of ``POST /v1/completions`` with ``stream: true`` and
sample.py-like settings (temperature 0.8, top_k 200), each with its own random prompt, all sent at
once. Reported per N:
- aggregate tok/s: generated tokens of all clients / wall time from the first request to the last
  ``[DONE]``;
- TTFT p50/p99 (ms): request sent -> first text chunk (includes the wait for a batch row, the prefill);
- per-token latency p50/p99 (ms): gaps between a stream's successive text chunks (one token each,
  but for a character split across tokens);
- speedup: aggregate tok/s over N=1's.

With ``--ckpt`` the server runs a trained model (``gpt serve``'s loader) and each prompt is a window
of ``--corpus`` that starts at a line; ``--draft`` (ngram or a run) turns on speculative decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import get_args

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import itertools

from gpt.device import resolve_dtype
from gpt.infer.config import ServeConfig
from gpt.infer.engine import compile_decode
from gpt.model import GPT, GPTConfig
from gpt.serve.server import load_for_serving
from gpt.tokenizer import char_tokenizer
from gpt.tokenizer_load import gpt2_tokenizer
from gpt.typed_config import Dtype

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"
SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256, vocab_size=128),  # a smoke test
}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def one_client(client, prompt: list[int], new_tokens: int, temperature: float) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "stream": True,
        "temperature": temperature,
        "top_k": 200,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] - sent if stamps else None, "gaps": gaps, "tokens": tokens}


def random_prompts(n: int, prompt_len: int, vocab: int, seed: int, corpus: list[int] | None
                   ) -> list[list[int]]:  # fmt: skip
    """n prompts of prompt_len tokens: random ids, or windows of the corpus's ids."""
    g = torch.Generator().manual_seed(seed)
    if corpus is None:
        return [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]
    starts = torch.randint(0, len(corpus) - prompt_len, (n,), generator=g).tolist()
    return [corpus[i : i + prompt_len] for i in starts]


async def measure(url: str, n: int, prompt_len: int, new_tokens: int, vocab: int, seed: int,
                  temperature: float = 0.8, corpus: list[int] | None = None) -> dict:  # fmt: skip
    import httpx

    prompts = random_prompts(n, prompt_len, vocab, seed, corpus)
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, p, new_tokens, temperature) for p in prompts))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]  # a stream may end before any text
    gaps = [gap for r in results for gap in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": n,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1),
        "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
        "tpot_p50_ms": round(1e3 * percentile(gaps, 50), 1),
        "tpot_p99_ms": round(1e3 * percentile(gaps, 99), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="gpt2")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=get_args(Dtype))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    p.add_argument("--ckpt", default=None, help="serve this trained model instead (any gpt serve ckpt)")
    p.add_argument("--corpus", default=str(CORPUS), help="--ckpt: prompts are windows of this text")
    p.add_argument("--draft", default=None, help="speculative decoding: ngram or a draft model's run")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--compile", action="store_true", help="compile the decode step (gpt serve compile=true)")
    args = p.parse_args()
    from helpers_serve import live_server

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = ServeConfig(max_batch=max(args.clients), max_queue=max(args.clients), device=args.device,
                      dtype=args.dtype, draft=args.draft, ckpt=args.ckpt or ServeConfig.ckpt,
                      compile=args.compile)  # fmt: skip
    corpus = None
    if args.ckpt:
        served = load_for_serving(cfg)
        model, tok = served.model, served.tokenizer
        text = Path(args.corpus).read_text()
        corpus = tok.encode(text[text.index("\n", len(text) // 2) + 1 :])  # the corpus's second half
        args.model = args.ckpt
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SHAPES[args.model])).to(device=device, dtype=dtype).eval()
        tok = gpt2_tokenizer() if args.model == "gpt2" else char_tokenizer(["abcdefghijklmnopqrstuvwxyz .,"])
        if args.compile and args.draft is None:  # as load_for_serving does
            compile_decode(model)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(
        f"{args.model}: {model.num_params() / 1e6:.1f}M parameters, {device}, {str(dtype)[6:]}, "
        f"{torch.get_num_threads()} threads, {machine}; prompts of {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each, temperature {args.temperature}, draft {args.draft}",
        flush=True,
    )
    rows = []
    with live_server(model, tok, cfg, name="bench") as server:
        for n in [1, max(args.clients)] if args.compile else [1]:  # warm-up (compiles: 1 row, several)
            warm = measure(server.url, n, args.prompt_tokens, 8, tok.vocab_size, 99, args.temperature, corpus)
            asyncio.run(warm)
        for n in args.clients:
            row = asyncio.run(measure(server.url, n, args.prompt_tokens, args.new_tokens, tok.vocab_size, n,
                                      args.temperature, corpus))  # fmt: skip
            row["speedup"] = round(row["tok_s"] / rows[0]["tok_s"], 2) if rows else 1.0
            rows.append(row)
            print(
                f"N={n:>3}  {row['tok_s']:>8.1f} tok/s  x{row['speedup']:<5}  "
                f"TTFT p50 {row['ttft_p50_ms']:>7.1f} "
                f"p99 {row['ttft_p99_ms']:>7.1f} ms  per-token p50 {row['tpot_p50_ms']:>6.1f} "
                f"p99 {row['tpot_p99_ms']:>6.1f} ms  ({row['tokens']} tokens in {row['wall_s']} s)",
                flush=True,
            )
        occupancy = server.service.batcher.stats
        print(
            f"mean batch occupancy {occupancy.step_rows / max(occupancy.steps, 1):.2f} rows over "
            f"{occupancy.steps} steps"
        )
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                record = {"model": args.model, "device": str(device), "draft": args.draft, **row}
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
