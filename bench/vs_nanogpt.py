"""Training speed side by side with nanoGPT (Karpathy's), at nanoGPT's shapes, in one run.

nanoGPT is not a dependency: give the path of a nanoGPT checkout whose Shakespeare data is prepared
(``python data/shakespeare_char/prepare.py`` inside it). Both trainers run as subprocesses, in
turns (nanoGPT, ours, nanoGPT, ours, ...), so that a drifting load on a shared machine hits both
alike; each turn runs --iters optimizer steps, the first --skip of which are not timed (start-up,
allocator warm-up). Printed per shape: median ms/step and tokens/s of each, and ours / nanoGPT.

    python bench/vs_nanogpt.py ~/src/nanoGPT                       # both shapes, 3 rounds
    python bench/vs_nanogpt.py ~/src/nanoGPT --shapes cpu --rounds 5 --iters 60
    python bench/vs_nanogpt.py ~/src/nanoGPT --ours-dtype fp32     # same precision as nanoGPT's CPU run
    python bench/vs_nanogpt.py ~/src/nanoGPT --compile             # ours with train.compile=true
    python bench/vs_nanogpt.py ~/src/nanoGPT --compile --nanogpt-compile --skip 10   # both compiled
    python bench/vs_nanogpt.py ~/src/nanoGPT --bare --shapes cpu --rounds 8   # the models alone

Shapes (nanoGPT's): ``cpu`` is the README's CPU recipe (4 layers, 4 heads, width 128, block 64,
batch 12), ``6x384`` its Shakespeare model (6 layers, 6 heads, width 384, block 256, batch 8).
Dropout is 0 for both. nanoGPT runs as its README says for CPUs (``--device=cpu --compile=False``,
fp32 there); ours runs ``train.py`` with the same shape and batch and its default precision policy
(``train.dtype=auto``: bf16 on CPUs with AVX512-BF16/AMX), or ``--ours-dtype``; eager unless
``--compile`` (the compiled turns' first steps include compilation: raise --skip if they show);
nanoGPT with ``--compile=True`` under ``--nanogpt-compile``. Besides the medians over all rounds,
the table gives the median and range of the per-round ratio (each round's turns run back to back,
so that ratio drifts least with the machine's load).

``--bare`` times the models alone, in this one process: forward, loss, backward, clipping and the
optimizer step on one fixed batch, no data loading or logging, nanoGPT's model and optimizer (from
its ``model.py``, fp32) against ours (the default char model at nanoGPT's shape, our optimizer,
``--ours-dtype``'s autocast), ``--iters`` steps a turn, in alternating turns.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
NANO_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
OURS_LINE = re.compile(r"^step +(\d+)/\d+ \|.*\| ([\d.]+) ms/step")


def nanogpt_command(
    nanogpt: Path, shape: dict, iters: int, out_dir: Path, compile: bool = False
) -> list[str]:
    """nanoGPT's CPU command line for ``shape``; evaluation and checkpoints pushed out of the way
    (it evaluates once at iteration 0, on one batch)."""
    return [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
        f"--compile={compile}", f"--n_layer={shape['n_layer']}", f"--n_head={shape['n_head']}",
        f"--n_embd={shape['n_embd']}",
        f"--block_size={shape['block_size']}", f"--batch_size={shape['batch_size']}", "--dropout=0.0",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--eval_iters=1", "--eval_interval=100000",
        "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False", f"--out_dir={out_dir}",
    ]  # fmt: skip


def ours_command(shape: dict, iters: int, out_dir: Path, dtype: str, compile: bool = False) -> list[str]:
    """Our train.py at the same shape and batch, logging every step, no evals or checkpoints."""
    return [
        sys.executable, str(REPO / "train.py"), f"model.n_layer={shape['n_layer']}",
        f"model.n_head={shape['n_head']}", f"model.n_embd={shape['n_embd']}",
        f"model.block_size={shape['block_size']}", f"train.batch_size={shape['batch_size']}",
        "model.dropout=0.0", f"train.max_steps={iters}", "train.eval_interval=0", "train.log_interval=1",
        "train.ckpt_interval=0", "train.progress=false", f"train.dtype={dtype}", "wandb.mode=disabled",
        "device=cpu", f"out_dir={out_dir}", "overwrite=true", f"train.compile={str(compile).lower()}",
    ]  # fmt: skip


def step_times(output: str, pattern: re.Pattern, skip: int) -> list[float]:
    """Milliseconds per step from a trainer's log lines, without the first ``skip`` steps."""
    times = []
    for line in output.splitlines():
        m = pattern.match(line.strip())
        if m and int(m.group(1)) > skip:
            times.append(float(m.group(2)))
    return times


def run(cmd: list[str], cwd: Path, timeout: float) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(cmd[:3])} ... failed (exit {p.returncode}):\n"
            f"{p.stdout[-2000:]}{p.stderr[-2000:]}"
        )
    return p.stdout + p.stderr


def summary(name: str, shape: dict, nano: list[float], ours: list[float], rounds: list[float]) -> dict:
    """Median ms/step and tokens/s of each trainer, our speed over nanoGPT's, and the median and
    range of that ratio per round (``rounds``: nanoGPT's median / ours, one per round)."""
    tokens = shape["batch_size"] * shape["block_size"]
    n_ms, o_ms = statistics.median(nano), statistics.median(ours)
    return {
        "shape": name,
        "tokens_per_step": tokens,
        "nanogpt_ms": round(n_ms, 1),
        "ours_ms": round(o_ms, 1),
        "nanogpt_tok_s": round(tokens / n_ms * 1000),
        "ours_tok_s": round(tokens / o_ms * 1000),
        "speedup": round(n_ms / o_ms, 2),
        "per_round": f"{statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})",
    }


def bare_steps(nanogpt: Path, shape: dict, rounds: int, iters: int, dtype: str) -> tuple[list, list]:
    """(nanoGPT's ms/step per turn, ours per turn): the models' steps alone, alternating in this
    process (see the module docstring)."""
    import contextlib
    import importlib.util
    import time

    import torch

    from gpt.config import OptimConfig, TrainRunConfig
    from gpt.device import autocast_for, keep_freed_memory, resolve_dtype
    from gpt.model import GPT, GPTConfig
    from gpt.train.optim import configure_optimizer

    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    nano = importlib.util.module_from_spec(spec)  # nanoGPT's model.py, not put on sys.path
    spec.loader.exec_module(nano)

    keep_freed_memory()  # as our training runs do on a CPU
    dims = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    B, T = shape["batch_size"], shape["block_size"]
    x = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter counts
        theirs = nano.GPT(nano.GPTConfig(**dims, vocab_size=65, dropout=0.0, bias=False))
        their_opt = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    preset = TrainRunConfig().model.given()  # the default run's shape
    ours = GPT(GPTConfig(**{**preset, **dims, "vocab_size": 128, "dropout": 0.0}))  # the padded char vocab
    our_opt = configure_optimizer(ours, OptimConfig(lr=1e-3, weight_decay=0.1), "cpu")  # = theirs
    autocast = autocast_for(torch.device("cpu"), resolve_dtype(dtype, torch.device("cpu")))

    def their_step() -> None:
        _, loss = theirs(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    def our_step() -> None:
        with autocast:
            loss = ours(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0, foreach=True)
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    times: tuple[list, list] = ([], [])
    for step in (their_step, our_step):  # warm-up
        for _ in range(3):
            step()
    for _ in range(rounds):
        for step, out in zip((their_step, our_step), times, strict=True):
            t = time.perf_counter()
            for _ in range(iters):
                step()
            out.append((time.perf_counter() - t) / iters * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nanogpt", type=Path, help="path of a nanoGPT checkout (data/shakespeare_char prepared)")
    p.add_argument("--shapes", default="cpu,6x384", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=3, help="turns of each trainer per shape")
    p.add_argument("--iters", type=int, default=40, help="optimizer steps per turn")
    p.add_argument("--skip", type=int, default=5, help="first steps of a turn not timed")
    p.add_argument("--ours-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="ours with train.compile=true")
    p.add_argument("--nanogpt-compile", action="store_true", help="nanoGPT with --compile=True")
    p.add_argument("--bare", action="store_true", help="the models' steps alone, in this process")
    p.add_argument("--timeout", type=float, default=900, help="seconds per turn")
    args = p.parse_args(argv)
    nanogpt = args.nanogpt.expanduser().resolve()
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "model.py").is_file():
        raise SystemExit(f"error: {nanogpt} is not a nanoGPT checkout (no train.py and model.py there)")
    if not (nanogpt / "data" / "shakespeare_char" / "train.bin").is_file():
        raise SystemExit(
            f"error: nanoGPT's data is not prepared; run: "
            f"cd {nanogpt} && python data/shakespeare_char/prepare.py"
        )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            shape, nano, ours, rounds = SHAPES[name], [], [], []
            if args.bare:
                nano, ours = bare_steps(nanogpt, shape, args.rounds, args.iters, args.ours_dtype)
                rounds = [a / b for a, b in zip(nano, ours, strict=True)]
                results.append(summary(name, shape, nano, ours, rounds))
                continue
            for r in range(args.rounds):
                cmd = nanogpt_command(nanogpt, shape, args.iters, Path(tmp) / "nano", args.nanogpt_compile)
                n_times = step_times(run(cmd, nanogpt, args.timeout), NANO_LINE, args.skip)
                cmd = ours_command(shape, args.iters, Path(tmp) / "ours", args.ours_dtype, args.compile)
                o_times = step_times(run(cmd, REPO, args.timeout), OURS_LINE, args.skip)
                nano, ours = nano + n_times, ours + o_times
                rounds.append(statistics.median(n_times) / statistics.median(o_times))
                print(f"{name} round {r + 1}/{args.rounds}: nanoGPT {statistics.median(n_times):.1f} ms, "
                      f"ours {statistics.median(o_times):.1f} ms, ratio {rounds[-1]:.2f}",
                      file=sys.stderr, flush=True)  # fmt: skip
            results.append(summary(name, shape, nano, ours, rounds))
    print(
        f"cpus {os.cpu_count()}, ours train.dtype={args.ours_dtype} train.compile={args.compile}, "
        f"nanoGPT --compile={args.nanogpt_compile}, {args.rounds} rounds x {args.iters} steps"
        + (" (--bare: the models alone, in one process)" if args.bare else "")
    )
    print(
        "| shape | tokens/step | nanoGPT ms/step | ours ms/step | nanoGPT tok/s | ours tok/s "
        "| ours / nanoGPT | per round: median (range) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in results:
        print(f"| {s['shape']} | {s['tokens_per_step']} | {s['nanogpt_ms']} | {s['ours_ms']} | "
              f"{s['nanogpt_tok_s']:,} | {s['ours_tok_s']:,} | {s['speedup']}x | "
              f"{s['per_round']} |")  # fmt: skip


if __name__ == "__main__":
    main()
