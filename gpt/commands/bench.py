"""Training throughput benchmark: tokens/s, ms/step, MFU against the device's measured matmul peak,
and peak memory, for model presets on random tokens (no data preparation involved).

    gpt bench                                   # shakespeare_char and gpt2 shapes, this device
    gpt bench models=[gpt2] dtype=bf16 compile=true batch=8 steps=20

MFU here is the model's training FLOPs per second divided by the *measured* peak of a large matmul
in the same dtype on this device (not the vendor's datasheet number), so it says how much of what
the hardware really delivers the model uses.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from gpt.commands.cli import Command, main
from gpt.config import OptimConfig, TrainRunConfig
from gpt.device import autocast_for, measure_peak_flops, pick_device, resolve_dtype, synchronize
from gpt.model import GPT, GPTConfig
from gpt.train.optim import configure_optimizer
from gpt.typed_config import REPO_ROOT, Dtype, check_ranges, from_dict


@dataclass
class BenchConfig:
    """``gpt bench``: which model shapes to time, and how."""

    models: list[str] = field(default_factory=lambda: ["shakespeare_char", "gpt2"])
    """conf/model presets to measure."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """auto | fp32 | bf16 | fp16 (the one dtype policy of gpt.device)."""
    batch: int | None = None
    """Sequences per step; None = 64 for shakespeare_char, 4 otherwise."""
    steps: int = 10
    """Timed steps (after 3 warm-up steps); the median is reported."""
    compile: bool = False
    """torch.compile the model."""
    json: str | None = None
    """Append the results as JSON lines to this file."""

    def __post_init__(self) -> None:
        check_ranges("", self, [("batch", self.batch is None or self.batch >= 1, "must be >= 1 or null"),
                                ("steps", self.steps >= 1, "must be >= 1")])  # fmt: skip


COMMAND = Command("bench", schema=BenchConfig, free_text=("json",),
                  usage="gpt bench [models=[gpt2]] [dtype=bf16] [compile=true] ...")  # fmt: skip


def bench_training(
    preset: dict, device: torch.device, dtype: torch.dtype, batch: int, steps: int, compile: bool
) -> dict:
    """Median step time of forward + backward + AdamW on random tokens for one model shape."""
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
        synchronize(device)
        t0 = time.perf_counter()
        with autocast_for(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
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
    """A model preset (the default run's shape changed by conf/model/NAME.yaml) as a GPTConfig dict
    (vocab: 50304 unless set)."""
    path = REPO_ROOT / "conf" / "model" / f"{name}.yaml"
    shape = {**TrainRunConfig().model.given(), **(yaml.safe_load(path.read_text()) or {})}
    d = {k: v for k, v in shape.items() if v is not None}
    d.setdefault("vocab_size", 128 if name == "shakespeare_char" else 50304)
    return d


def job(plain: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = from_dict(BenchConfig, plain)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")  # fmt: skip
    results = []
    for model_name in cfg.models:
        batch = cfg.batch or (64 if model_name == "shakespeare_char" else 4)
        preset = load_preset(model_name)
        r = {
            "model": model_name,
            **bench_training(preset, device, dtype, batch, cfg.steps, cfg.compile),
        }
        print(json.dumps(r))
        if cfg.json:
            with open(cfg.json, "a") as f:  # appending a log of lines: no atomic rewrite wanted
                f.write(json.dumps({"device": name, **r}) + "\n")
        results.append(r)
    return results


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return main(job, COMMAND, argv)

