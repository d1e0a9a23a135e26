"""Generation benchmark: decode tokens/s with the KV cache against re-running the whole context each
step, and time to first token (TTFT), for the shakespeare_char and GPT-2-124M shapes (random
weights: speed does not depend on them).

    python bench/bench_generate.py                                   # both models on this CPU
    python bench/bench_generate.py --models gpt2 --device cuda --dtype bf16
    python bench/bench_generate.py --threads 1 --repeats 5 --json results.jsonl
    python bench/bench_generate.py --models gpt2 --dtype auto --new-tokens 64   # the dtype policy
    python bench/bench_generate.py --models gpt2 --ttft-only --new-tokens 32     # prefill + decode only
    python bench/bench_generate.py --models gpt2 --ttft-only --threads 1 --clock cpu   # a loaded machine

Each run: a 256-token prompt, then 512 new tokens sampled with sample.py's defaults (temperature 0.8,
top_k 200). Reported, as medians over --repeats runs (each run measures all of them in turn):
- ttft_ms: prompt -> first sampled token (one prefill forward of the whole prompt, logits for its
  last position only: ``GPT.forward(last_only=True)``);
- ttft_all_logits_ms: the same when the prefill computes logits for every prompt position (what the
  engine did before ``last_only``), timed in the same runs for a side-by-side comparison;
- cached tok/s: the 511 following tokens, one single-token forward each (gpt.infer.engine.Decoder);
- recompute tok/s: the same tokens when every step re-runs the model over the whole context (the last
  block_size tokens, as nanoGPT does). The baseline computes logits for the last position only, as
  nanoGPT's loop does, so it is not slowed by work it does not need. A step's cost depends only on
  the context length, so by default 8 context lengths, evenly spaced, are timed (twice each) and the
  511 steps summed by linear interpolation (--recompute-points 0 times every step);
- speedup: cached over recompute decode speed, per run;
- end-to-end tok/s: gpt.infer.generate.generate() for the whole job (prefill, sampling, text streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.device import cpu_name, pick_device, resolve_dtype
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder, KVCache
from gpt.infer.generate import generate
from gpt.infer.sampling import choose_next
from gpt.model import GPT, GPTConfig
from gpt.typed_config import REPO_ROOT, Dtype

MODELS = {
    # nanoGPT's char-level Tiny Shakespeare model (10.7M parameters); vocabulary 65 padded to 128
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=128, bias=False),
    # GPT-2 small (124M)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}
SETTINGS = GenerationConfig(temperature=0.8, top_k=200, seed=1337)
clock = time.perf_counter  # --clock cpu: this process's CPU time (steadier on a loaded machine)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def tokenizer_for(name: str):
    from gpt.tokenizer import char_tokenizer
    from gpt.tokenizer_load import gpt2_tokenizer

    if name == "gpt2":
        return gpt2_tokenizer()
    return char_tokenizer([(REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()])


@torch.inference_mode()
def time_cached(model: GPT, prompt: torch.Tensor, new_tokens: int, vocab: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the remaining new_tokens - 1) with the KV cache."""
    device = prompt.device
    gen = torch.Generator(device=device).manual_seed(SETTINGS.seed)
    decoder = Decoder(model, 1)
    sync(device)
    start = clock()
    next_ids = choose_next(decoder.prefill(prompt)[:, :vocab].float(), SETTINGS, gen)
    next_ids.tolist()  # the engine reads every token (streaming, stop checks): include that sync
    first = clock()
    for _ in range(new_tokens - 1):
        next_ids = choose_next(decoder.step(next_ids)[:, :vocab].float(), SETTINGS, gen)
        next_ids.tolist()
    sync(device)
    return first - start, clock() - first


@torch.inference_mode()
def time_first_token_all_logits(model: GPT, prompt: torch.Tensor, vocab: int) -> float:
    """Seconds to the first token when the prefill computes logits for every prompt position."""
    device = prompt.device
    gen = torch.Generator(device=device).manual_seed(SETTINGS.seed)
    weight = model.lm_head.weight
    cache = KVCache(model.config, 1, weight.device, weight.dtype)
    sync(device)
    start = clock()
    cache.begin(0, 1, prompt.size(1))
    logits = model(prompt, kv_cache=cache)[:, -1]  # (1, T, vocab) computed, the last row used
    choose_next(logits[:, :vocab].float(), SETTINGS, gen).tolist()
    sync(device)
    return clock() - start


@torch.inference_mode()
def time_recompute(model: GPT, prompt: torch.Tensor, new_tokens: int, vocab: int, points: int) -> float:
    """Seconds for new_tokens - 1 steps that each re-run the last block_size tokens of the context."""
    device, block_size = prompt.device, model.config.block_size
    gen = torch.Generator(device=device).manual_seed(SETTINGS.seed)
    lengths = [min(prompt.size(1) + i, block_size) for i in range(1, new_tokens)]  # context per step
    context = torch.randint(0, vocab, (1, block_size), device=device)

    def step(length: int) -> float:
        sync(device)
        start = clock()
        choose_next(model(context[:, :length], last_only=True)[:, -1, :vocab].float(), SETTINGS, gen).tolist()
        sync(device)
        return clock() - start

    if not points or points >= len(lengths):
        return sum(step(n) for n in lengths)
    probe = sorted({lengths[round(i * (len(lengths) - 1) / (points - 1))] for i in range(points)})
    cost = [statistics.median(step(n) for _ in range(2)) for n in probe]
    return float(np.interp(lengths, probe, cost).sum())


def bench_model(name: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[name])).to(device=device, dtype=dtype).eval()
    tok = tokenizer_for(name)
    text = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    prompt_ids = tok.encode(text)[: args.prompt_tokens]
    prompt = torch.tensor([prompt_ids], device=device)
    vocab = tok.vocab_size
    time_cached(model, prompt, 8, vocab)  # warm-up: kernels, allocator, the first refill
    cfg = GenerationConfig(**{**vars(SETTINGS), "max_new_tokens": args.new_tokens})
    steps = args.new_tokens - 1
    runs = []
    # the three measurements interleaved, so that each run's speedup is taken under the same load
    # (on a shared machine the load drifts between runs)
    for _ in range(args.repeats):
        ttft, decode = time_cached(model, prompt, args.new_tokens, vocab)
        ttft_all = time_first_token_all_logits(model, prompt, vocab)
        run = {"ttft_ms": ttft * 1000, "ttft_all_logits_ms": ttft_all * 1000, "cached_tok_s": steps / decode}
        if not args.ttft_only:
            recompute = time_recompute(model, prompt, args.new_tokens, vocab, args.recompute_points)
            sync(device)
            start = clock()
            generate(model, tok, prompt_ids, cfg)
            sync(device)
            end_to_end = clock() - start
            run.update({
                "recompute_tok_s": steps / recompute,
                "speedup": recompute / decode,
                "end_to_end_tok_s": args.new_tokens / end_to_end,
            })  # fmt: skip
        runs.append(run)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {
        "model": name,
        "params_M": round(model.num_params() / 1e6, 1),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        **{key: round(value, 2) for key, value in median.items()},
        **({"speedup_runs": [round(run["speedup"], 1) for run in runs]} if "speedup" in runs[0] else {}),
        "ttft_ms_runs": [round(run["ttft_ms"]) for run in runs],
        "ttft_all_logits_ms_runs": [round(run["ttft_all_logits_ms"]) for run in runs],
        "cached_tok_s_runs": [round(run["cached_tok_s"], 1) for run in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shakespeare_char,gpt2", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=get_args(Dtype),
        help="weights' dtype; auto = the policy of sample.py (gpt.device.resolve_dtype)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recompute-points", type=int, default=8, help="timed context lengths; 0 = every step")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall time, or this process's CPU time (all threads: use --threads 1)",
    )
    p.add_argument("--ttft-only", action="store_true", help="time the first token and cached decode only")
    p.add_argument("--json", type=Path, default=None, help="append results as JSON lines here")
    args = p.parse_args()
    global clock
    if args.clock == "cpu":
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({hw}), {args.dtype} = {str(dtype).removeprefix('torch.')}, "
          f"torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")  # fmt: skip
    for name in args.models.split(","):
        result = bench_model(name, device, dtype, args)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"device": hw, "dtype": args.dtype, "threads": torch.get_num_threads(),
                                    "date": time.strftime("%Y-%m-%d"), **result}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
