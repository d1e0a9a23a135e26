"""Where a batch-1 decode step of GPT-2 124M goes on this CPU, and how close it is to the roofline.

    python bench/bench_decode_step.py gemv      # the four GEMV shapes at M=1: F.linear bf16 / fp32 vs packed
    python bench/bench_decode_step.py attention # one query over S cached keys: SDPA vs one_token_attention
    python bench/bench_decode_step.py profile   # torch.profiler over decode steps: a table by kind of op
    python bench/bench_decode_step.py ab        # tok/s before / after gpt.ops' kernels, interleaved rounds
    python bench/bench_decode_step.py ab --compiled --batch 16  # and the compiled step (compile_decode)

A seeded random GPT-2 124M (``GPTConfig()``: 12 x 768, vocab 50304, block 1024) in bf16, --threads
threads (2 by default). Every comparison alternates its variants inside one process, round after
round, and prints medians, with the load average before and after (the machine is shared). The
roofline: a batch-1 step reads every weight once, so tok/s <= read bandwidth / weight bytes, the
bandwidth measured in every round as bench/vs_peers.py does (the sum of a 1 GiB fp32 tensor).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpt.model
from gpt.infer.engine import Decoder, compile_decode
from gpt.infer.generate import greedy_batch
from gpt.model import GPT, GPTConfig
from gpt.ops import linear, one_token_attention
from gpt.tokenizer_load import gpt2_tokenizer

SHAPES = {"qkv": (2304, 768), "mlp up": (3072, 768), "mlp down": (768, 3072), "head": (50304, 768)}


def read_bandwidth(x: torch.Tensor) -> float:
    """GB/s reading x (best of 3 sums)."""
    best = min(timed(x.sum) for _ in range(3))
    return x.numel() * x.element_size() / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def build_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=1024)).to(torch.bfloat16).eval()


def weight_bytes(model: GPT) -> int:
    unique = {p.data_ptr(): p for p in model.parameters()}.values()  # the tied head counts once
    return sum(p.numel() * p.element_size() for p in unique)


# --------------------------------------------------------------------------------------------- gemv
def gemv(args) -> None:
    """Each shape's weight in enough copies (~300 MB) that every call reads it from memory."""
    for name, (out, inp) in SHAPES.items():
        copies = min(12, max(1, 300_000_000 // (out * inp * 2)))
        times = gemv_times(out, inp, copies, args.rounds)
        print(f"{name} {out}x{inp} (bf16 {out * inp * 2 / 1e6:.1f} MB, {copies} copies):")
        for variant, ts in times.items():
            t = statistics.median(ts[1:])
            print(f"  {variant:30s} {t * 1e6:7.0f} us  {out * inp * 2 / t / 1e9:5.1f} GB/s of the bf16 bytes")


def gemv_times(out: int, inp: int, copies: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, round by round (round 0 warms up and packs)."""
    layers = [torch.nn.Linear(inp, out).bfloat16() for _ in range(copies)]
    fp32 = [torch.nn.Linear(inp, out) for _ in range(copies)]
    same_bytes = [torch.randn(out * inp // 2) for _ in range(copies)]  # fp32, the bf16 weight's bytes
    x = torch.randn(1, inp)
    xb = x.bfloat16()
    variants = {
        "read (sum of the same bytes)": lambda k: same_bytes[k].sum(),
        "F.linear bf16": lambda k: F.linear(xb, layers[k].weight, layers[k].bias),
        "F.linear fp32 weights": lambda k: F.linear(x, fp32[k].weight, fp32[k].bias),
        "packed (gpt.ops.linear)": lambda k: linear(layers[k], xb),
    }
    times = defaultdict(list)
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for variant, fn in variants.items():
                t0 = time.perf_counter()
                for k in range(copies):
                    fn(k)
                times[variant].append((time.perf_counter() - t0) / copies)
    return times


def attention(args) -> None:
    """One layer's attention of a decode step (12 heads of 64, bf16) over S cached keys."""
    print(load())
    for S in (16, 80, 144, 1024):
        q = torch.randn(1, 12, 1, 64, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 12, 1024, 64, dtype=torch.bfloat16)[:, :, :S] for _ in range(2))  # cache views
        matmuls = lambda q, k, v, mask: one_token_attention(q, k, v, mask, min_keys=0)
        variants = {"SDPA": F.scaled_dot_product_attention, "one_token_attention's matmuls": matmuls}
        times = defaultdict(list)
        with torch.inference_mode():
            for _ in range(args.rounds + 1):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(20):
                        fn(q, k, v, None)
                    times[name].append((time.perf_counter() - t0) / 20)
        medians = ", ".join(f"{n} {statistics.median(t[1:]) * 1e6:.0f} us" for n, t in times.items())
        print(f"S={S}: {medians}")


# ------------------------------------------------------------------------------------------ profile
KINDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA over the cache)",
    "aten::copy_": "copies (KV cache writes, heads re-assembled, logits to fp32)",
    "aten::native_layer_norm": "layer norms",
    "aten::gelu": "GELU",
    "aten::add": "residual adds, position embedding",
    "aten::embedding": "embeddings",
    "aten::index_select": "embeddings",
    "aten::argmax": "argmax (greedy choice)",
}
GEMMS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, steps = build_model(), args.new_tokens
    if args.before:  # the layers themselves and SDPA: the code before gpt.ops' decode kernels
        gpt.model.linear, gpt.model.one_token_attention = (lambda layer, x: layer(x)), sdpa
    with torch.inference_mode():
        decoder = Decoder(model, 1)
        token = decoder.prefill(torch.randint(0, 50257, (1, args.prompt_tokens))).argmax(-1)
        for _ in range(8):  # warm up (packs the weights)
            token = decoder.step(token).float().argmax(-1)
        wall = timed(lambda: [decoder.step(token).float().argmax(-1) for _ in range(steps)]) / steps
        decoder = Decoder(model, 1)
        token = decoder.prefill(torch.randint(0, 50257, (1, args.prompt_tokens))).argmax(-1)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            profiled = timed(lambda: [decoder.step(token).float().argmax(-1) for _ in range(steps)]) / steps
    per_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in GEMMS:
            kind = gemm_kind(event.key, event.input_shapes)
        else:
            kind = KINDS.get(event.key, "other ops (views, empty, split, ...)")
        per_kind[kind] += event.self_cpu_time_total / 1e6 / steps
    per_kind["between ops (Python, dispatch)"] = max(0.0, profiled - sum(per_kind.values()))
    print(f"{load()}; step {wall * 1e3:.2f} ms without the profiler ({1 / wall:.1f} tok/s), "
          f"{profiled * 1e3:.2f} ms with it\n")  # fmt: skip
    print("| where | ms / step | share |\n|---|---|---|")
    for kind, t in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t * 1e3:.2f} | {t / profiled:.0%} |")


def gemm_kind(op: str, shapes: list) -> str:
    """The layer a GEMM belongs to, by its weight among the inputs: (out, in) for the packed op, its
    transpose (in, out) for addmm / mm."""
    dims = {tuple(s) for s in shapes if len(s) == 2}
    named = {**SHAPES, "attn proj": (768, 768)}
    for name, (out, inp) in named.items():
        if ((out, inp) if op == GEMMS[0] else (inp, out)) in dims:
            return f"GEMM {name} ({out}x{inp}{'' if name == 'head' else ', x12'})"
    return "GEMM other"


# ----------------------------------------------------------------------------------------------- ab
def ab(args) -> None:
    """tok/s of greedy_batch (sample.py's and eval's decode) and of the bare Decoder.step loop, alternating:
    before (the layers called as they are, SDPA), the packed weights alone, both kernels of gpt.ops, and
    with --compiled the step compiled (engine.compile_decode; its compile time is round 0's)."""
    model, tok, batch = build_model(), gpt2_tokenizer(), args.batch
    bound_bytes = weight_bytes(model)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    prompts = prompt.tolist() * batch  # equal rows: one batch of ``batch``
    plain = (lambda layer, x: layer(x), sdpa)  # the layers themselves and SDPA: the code before
    variants = {"before": plain, "packed linear": (linear, sdpa), "after": (linear, one_token_attention)}
    compiled = None
    if args.compiled:
        variants["compiled"] = (linear, one_token_attention)
        compile_decode(model)
        compiled = model.__dict__.pop("_compiled_step")  # put back for its variant alone
    results, greedy, big = defaultdict(list), {}, torch.ones(2**28)
    print(load())
    for round_ in range(args.rounds + 1):  # round 0 warms up
        bandwidth = read_bandwidth(big)
        results["roofline"].append(bandwidth * 1e9 / bound_bytes)
        for name, (gpt.model.linear, gpt.model.one_token_attention) in variants.items():  # what forward calls
            if name == "compiled":
                model.__dict__["_compiled_step"] = compiled
            t0 = time.perf_counter()
            greedy[name] = [c.ids for c in greedy_batch(model, tok, prompts, args.new_tokens)]
            wall = time.perf_counter() - t0
            results[f"{name} greedy_batch"].append(batch * args.new_tokens / wall)
            steps = bare_loop(model, args.prompt_tokens, args.new_tokens, batch)
            results[f"{name} Decoder.step"].append(batch * args.new_tokens / steps)
            model.__dict__.pop("_compiled_step", None)
            if round_ == 0 and name == "compiled":
                print(f"compiled variant, round 0 (compiles): {wall:.1f} s for greedy_batch", file=sys.stderr)
        last = ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items())
        print(f"round {round_}: {last}", file=sys.stderr)
    gpt.model.linear, gpt.model.one_token_attention = linear, one_token_attention
    print(f"{load()}; {bound_bytes / 1e6:.0f} MB of bf16 weights; batch {batch}; "
          f"medians of {args.rounds} rounds\n")  # fmt: skip
    print("| variant | tok/s | fraction of the roofline |\n|---|---|---|")
    roof = statistics.median(results.pop("roofline")[1:])
    print(f"| roofline (read bandwidth / weight bytes) | {roof:.0f} | 100% |")
    for name, speeds in results.items():
        speed = statistics.median(speeds[1:])
        print(f"| {name} | {speed:.1f} | {speed / roof:.0%} |")
    same = greedy["before"] == greedy["packed linear"] == greedy["after"]
    print(f"\ngreedy tokens identical between the eager variants: {same} ({len(greedy['after'][0])} tokens)")
    if compiled is not None:
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                 for x, y in zip(greedy["after"], greedy["compiled"])]  # fmt: skip
        print(f"compiled: tokens equal to eager's for the first {min(agree)} of {len(greedy['after'][0])}")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bare_loop(model: GPT, prompt_tokens: int, steps: int, batch: int = 1) -> float:
    """Seconds for ``steps`` decode steps of ``batch`` rows, the argmax alone (no text, no stop checks)."""
    with torch.inference_mode():
        decoder = Decoder(model, batch)
        token = decoder.prefill(torch.zeros(1, prompt_tokens, dtype=torch.long)).argmax(-1)
        return timed(lambda: [decoder.step(token).argmax(-1) for _ in range(steps)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("gemv", "attention", "profile", "ab"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--before", action="store_true", help="profile: without gpt.ops' decode kernels")
    p.add_argument("--batch", type=int, default=1, help="ab: rows decoded together")
    p.add_argument("--compiled", action="store_true", help="ab: also the compiled step (compile_decode)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"gemv": gemv, "attention": attention, "profile": profile, "ab": ab}[args.what](args)


if __name__ == "__main__":
    main()
