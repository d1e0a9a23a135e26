"""Training throughput benchmark: tokens/s, ms/step, MFU against the device's measured matmul peak,
and peak memory, for model presets on random tokens (no data preparation involved).

    python -m gpt.bench                                   # shakespeare_char and gpt2 shapes, this device
    python -m gpt.bench --models gpt2 --dtype bf16 --compile --batch 8 --steps 20

MFU here is the model's training FLOPs per second divided by the *measured* peak of a large matmul
in the same dtype on this device (not the vendor's datasheet number), so it says how much of what
the hardware really delivers the model uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Best FLOP/s of a square matmul in ``dtype`` on ``device`` (cached per process)."""
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, caches, clocks
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(5 if device.type == "cpu" else 10):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]


def bench_training(
    preset: dict, device: torch.device, dtype: torch.dtype, batch: int, steps: int, compile: bool
) -> dict:
    """Median step time of forward + backward + AdamW on random tokens for one model shape."""
    from gpt.config import OptimConfig
    from gpt.model import GPT, GPTConfig
    from gpt.optim import configure_optimizer
    from gpt.trainer import autocast_for

    torch.manual_seed(0)
    config = GPTConfig(**preset)
    model = GPT(config).to(device)
    opt = configure_optimizer(model, OptimConfig(), device.type)
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)
    y = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (compilation, allocator)
        _sync(device)
        t0 = time.perf_counter()
        with autocast_for(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = batch * config.block_size
    peak = measure_peak_flops(device, dtype)
    result = {
        "params_M": round(model.num_params() / 1e6, 2),
        "batch": batch,
        "block_size": config.block_size,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile,
        "ms_per_step": round(1000 * dt, 1),
        "tokens_per_s": round(tokens / dt),
        "mfu_pct": round(100 * model.flops_per_token(config.block_size) * tokens / dt / peak, 1),
        "peak_tflops_measured": round(peak / 1e12, 3),
    }
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        import resource

        result["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def load_preset(name: str) -> dict:
    """A model preset from conf/model/NAME.yaml as a GPTConfig dict (vocab: 50304 unless set)."""
    import yaml

    from gpt.config import REPO_ROOT

    path = REPO_ROOT / "conf" / "model" / f"{name}.yaml"
    d = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if v is not None}
    d.setdefault("vocab_size", 128 if name == "shakespeare_char" else 50304)
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shakespeare_char,gpt2", help="comma-separated conf/model presets")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 64 char, 4 gpt2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="append results as JSON lines here")
    args = p.parse_args()

    from gpt.distributed import pick_device
    from gpt.trainer import resolve_dtype

    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )
    for model_name in args.models.split(","):
        batch = args.batch or (64 if model_name == "shakespeare_char" else 4)
        r = {
            "model": model_name,
            **bench_training(load_preset(model_name), device, dtype, batch, args.steps, args.compile),
        }
        print(json.dumps(r))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"device": name, **r}) + "\n")


if __name__ == "__main__":
    main()
