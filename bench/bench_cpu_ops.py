"""The CPU kernels behind a training step, timed one by one, and a profile of the step itself.

What docs/benchmarks.md ("CPU training speed") rests on: causal attention fwd + bwd in fp32, in bf16
and with bf16 inputs computed in fp32 (what ``gpt.model.cpu_attention_upcast`` does for heads < 64);
the MLP nonlinearities fwd + bwd; gpt.ops' hand-written backward passes against autograd of the same
formulas; what RMSNorm (the chat model's), RoPE and ReLU^2 (also the default char model's) cost
against GPT-2's (nanoGPT's) LayerNorm, learned positions and GELU; matmuls in fp32 and bf16; and,
with --profile, torch.profiler's table of one training step of a model (forward, backward,
clipping, fused AdamW) under autocast.

    python bench/bench_cpu_ops.py                      # the kernel tables (about a minute on 2 cores)
    python bench/bench_cpu_ops.py --profile            # + the step profile of nanoGPT's CPU shape
    python bench/bench_cpu_ops.py --profile --only-profile --batch 16 --block 128 --dtype fp32

Times are medians of --repeats timed loops, in ms (us for the elementwise table); run it on a quiet
machine, the kernels are short. Freed memory is kept in the process, as a training run does
(``gpt.device.keep_freed_memory``): without it the larger elementwise kernels page-fault.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gpt.device import keep_freed_memory
from gpt.model import GPT, GPTConfig
from gpt.ops import relu_squared, rms_norm, rotate


def timed(fn, n: int, repeats: int) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` loops of ``n`` calls (after warm-up)."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(runs)


def attention_table(repeats: int) -> None:
    print(
        "| B, heads, T, head size | fp32 ms | bf16 ms | bf16 inputs in fp32 ms |\n| --- | --- | --- | --- |"
    )
    for B, H, T, D in [(12, 4, 64, 32), (16, 4, 128, 32), (8, 6, 256, 64), (4, 12, 1024, 64)]:
        row = []
        for mode in ("fp32", "bf16", "upcast"):
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3))

            def step(q=q, k=k, v=v, mode=mode):
                args = (q.float(), k.float(), v.float()) if mode == "upcast" else (q, k, v)
                F.scaled_dot_product_attention(*args, is_causal=True).sum().backward()

            row.append(timed(step, 10 if T < 1024 else 2, repeats))
        print(f"| {B}, {H}, {T}, {D} | " + " | ".join(f"{t:.2f}" for t in row) + " |")


def activation_table(repeats: int) -> None:
    acts = {
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "gelu": F.gelu,
        "relu2": lambda h: F.relu(h).square(),
    }
    print("\n| dtype, shape | " + " | ".join(f"{a} us" for a in acts) + " |\n| --- |" + " --- |" * len(acts))
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((768, 512), (2048, 1536)):
            x = torch.randn(*shape, dtype=dtype, requires_grad=True)
            g = torch.randn(*shape, dtype=dtype)
            row = [timed(lambda f=f, x=x, g=g: f(x).backward(g), 20, repeats) * 1e3 for f in acts.values()]
            print(
                f"| {str(dtype)[6:]}, {shape[0]} x {shape[1]} | " + " | ".join(f"{t:.0f}" for t in row) + " |"
            )


def ops_table(repeats: int) -> None:
    """gpt.ops (hand-written backward passes) against autograd of the same formulas, fwd + bwd, at the
    tensors a step of nanoGPT's CPU shape (B=12, T=64, 4 heads of 32, width 128) and of the default
    model (B=16, T=128) gives them: RoPE on q and k together, RMSNorm on the fp32 residual stream,
    ReLU^2 on the bf16 MLP hidden layer."""

    def rope_ref(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rms_ref(x, w):
        return F.rms_norm(x, (x.size(-1),), w, 1e-6)

    def rms_ours(x, w):
        return rms_norm(x, w, 1e-6)

    def relu2_ref(x):
        return F.relu(x).square()

    print("\n| op, shape | autograd of the formula us | gpt.ops us |\n| --- | --- | --- |")
    for B, T in ((12, 64), (16, 128)):
        angles = torch.randn(T, 1, 16)
        tables = (angles.cos(), angles.sin())
        w = torch.ones(128, requires_grad=True)
        cases = [  # (name, input shape and dtype, extra arguments, the formula, gpt.ops)
            (f"rotate q+k ({B}, {T}, 8, 32) fp32", (B, T, 8, 32), torch.float32, tables, rope_ref, rotate),
            (f"rms_norm ({B}, {T}, 128) fp32", (B, T, 128), torch.float32, (w,), rms_ref, rms_ours),
            (f"relu^2 ({B}, {T}, 512) bf16", (B, T, 512), torch.bfloat16, (), relu2_ref, relu_squared),
        ]  # fmt: skip
        for name, shape, dtype, extra, ref, ours in cases:
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            g = torch.randn_like(x)
            row = [
                timed(lambda f=f, x=x, g=g, e=extra: f(x, *e).backward(g), 20, repeats) * 1e3
                for f in (ref, ours)
            ]
            print(f"| {name} | {row[0]:.0f} | {row[1]:.0f} |")


def choices_table(repeats: int) -> None:
    """RMSNorm, RoPE and ReLU^2 against GPT-2's LayerNorm, learned positions and GELU, fwd + bwd in
    fp32 at nanoGPT's CPU recipe (B=12, T=64, width 128, 4 heads): per call, and per step (9 norms, 4
    rotations of q and k against one position add, 4 MLP activations)."""
    B, T = 12, 64
    angles = torch.randn(T, 1, 16)
    cos, sin = angles.cos(), angles.sin()
    w, pos = torch.ones(128, requires_grad=True), torch.randn(T, 128, requires_grad=True)
    pairs = [  # (ours, GPT-2's, input shape, calls per step of each)
        ("rms_norm", lambda x: rms_norm(x, w, 1e-6), "layer_norm", lambda x: F.layer_norm(x, (128,), w),
         (B, T, 128), 9, 9),
        ("rotate q+k", lambda x: rotate(x, cos, sin), "learned position add", lambda x: x + pos,
         (B, T, 8, 32), 4, 1),
        ("relu^2", relu_squared, "gelu (exact)", F.gelu, (B, T, 512), 4, 4),
    ]  # fmt: skip
    print("\n| ours | us | x per step | GPT-2's | us | x per step |\n| --- | --- | --- | --- | --- | --- |")
    for name, ours, ref_name, ref, shape, n_ours, n_ref in pairs:
        x = torch.randn(shape, requires_grad=True)
        x_ref = torch.randn(B, T, 128, requires_grad=True) if ref_name.startswith("learned") else x
        t_ours = timed(lambda x=x, f=ours: f(x).backward(x), 20, repeats) * 1e3
        t_ref = timed(lambda x=x_ref, f=ref: f(x).backward(x), 20, repeats) * 1e3
        print(f"| {name} | {t_ours:.0f} | {n_ours} | {ref_name} | {t_ref:.0f} | {n_ref} |")


def matmul_table(repeats: int) -> None:
    print(
        "\n| M x K x N | fp32 ms | bf16 ms | fp32 TFLOP/s | bf16 TFLOP/s |\n| --- | --- | --- | --- | --- |"
    )
    for M, K, N in [(768, 128, 384), (2048, 128, 512), (3072, 384, 1536)]:
        a, b = torch.randn(M, K), torch.randn(K, N)
        a16, b16 = a.bfloat16(), b.bfloat16()
        t32 = timed(lambda a=a, b=b: a @ b, 50, repeats)
        t16 = timed(lambda a=a16, b=b16: a @ b, 50, repeats)
        flop = 2 * M * K * N
        print(
            f"| {M} x {K} x {N} | {t32:.3f} | {t16:.3f} | {flop / t32 / 1e9:.2f} | {flop / t16 / 1e9:.2f} |"
        )


def profile_step(args: argparse.Namespace) -> None:
    """torch.profiler's top ops over 10 training steps of the default char model's architecture
    (``--norm rmsnorm``: the chat model's norm)."""
    from torch.profiler import profile

    torch.manual_seed(0)
    shape = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width, block_size=args.block)
    config = GPTConfig(
        **shape, vocab_size=128, bias=False, norm=args.norm, pos_emb="rope", activation=args.activation
    )
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 65, (args.batch, args.block))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, 20, args.repeats)
    print(
        f"\nstep: {ms:.1f} ms ({args.layers}x{args.width}, batch {args.batch} x {args.block}, {args.dtype})"
    )
    with profile() as p:
        for _ in range(10):
            step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also profile a training step")
    p.add_argument("--only-profile", action="store_true", help="skip the kernel tables")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="the profiled step's autocast")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--activation", default="relu2", choices=["gelu_tanh", "gelu", "relu2"])
    p.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a training run on the CPU does
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.only_profile:
        attention_table(args.repeats)
        activation_table(args.repeats)
        ops_table(args.repeats)
        choices_table(args.repeats)
        matmul_table(args.repeats)
    if args.profile or args.only_profile:
        profile_step(args)


if __name__ == "__main__":
    main()
