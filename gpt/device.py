"""Devices and the one dtype policy: which device a process uses, which precision training and
inference compute in, the autocast context for it, and the measured matmul peak that MFU is
reported against.

    device = pick_device("auto")                    # CUDA, then Apple's MPS, then the CPU
    dtype = resolve_dtype("auto", device, key="train.dtype")
    with autocast_for(device, dtype):
        loss = model(x, y)
    peak = measure_peak_flops(device, dtype)        # FLOP/s of a large matmul, cached per process
    keep_freed_memory()                             # CPU training: glibc keeps freed blocks for reuse

The policy, for training, sampling and serving alike: ``auto`` is bf16 on CUDA GPUs that have it
(fp16 otherwise), bf16 on CPUs that compute it natively (AVX512-BF16 or AMX-BF16: there bf16
autocast trains 1.2-2.5x faster than fp32, docs/benchmarks.md), fp32 elsewhere (on other CPUs bf16
is emulated and slower, and Apple's MPS gains little). fp16 on a CPU is refused (about 1 GFLOP/s
there). The choice reads the CPU's feature flags, not a timing, so every process of a job and every
run on the same machine make the same choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gpt.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' prefers CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not mps_available():
        raise ConfigError("device=mps but Apple's MPS backend is not available; use device=auto")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"device={name!r} must be auto, cpu, cuda or mps")
    return torch.device(name)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 matmul instructions (x86 AVX512-BF16 or AMX-BF16), read from the
    capabilities torch's CPU dispatcher detected, else from /proc/cpuinfo (Linux)."""
    caps: dict = {}
    # a private but long-standing torch call; its absence only means "look elsewhere"
    with contextlib.suppress(AttributeError, RuntimeError, TypeError):
        caps = dict(torch._C._cpu._get_cpu_capability())
    if caps:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device, key: str = "dtype") -> torch.dtype:
    """The compute dtype for ``name`` (auto, fp32, bf16, fp16: the config's ``Dtype`` checked it) on
    ``device``; ``key`` names the setting where the device refuses it (``train.dtype`` or ``dtype``)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_bf16_native():
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type == "cpu":
        raise ConfigError(f"{key}=fp16 is not supported on the CPU (very slow there); use bf16 or fp32")
    return DTYPES[name]


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for ``dtype`` (weights stay fp32); a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process instead of returning it to the kernel.

    Why: a CPU training step frees and re-allocates the same activation-sized blocks every step.
    By default glibc serves blocks above an adaptive threshold (128 KiB at first) with fresh mmap
    pages and trims the heap's top when it is freed, so the next step pays a page fault per 4 KiB
    touched again. Measured on 2 cores at nanoGPT's CPU shape: 60-1100 faults a step without it and
    ~1.18x slower steps (docs/benchmarks.md). The cost: the process's resident memory stays at its peak.
    Returns whether it applied (glibc on Linux only; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim_threshold, mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
        # blocks up to 32 MiB (glibc's maximum) from the heap; trim only beyond 1 GiB free at its top
        return bool(libc.mallopt(mmap_threshold, 32 << 20)) and bool(libc.mallopt(trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate (a CPU: the kernel's MemAvailable, which counts reclaimable
    caches); None where it cannot be told. Training and decoding refuse shapes that cannot fit with it."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type != "cpu":
            return None
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


@functools.cache
def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Best FLOP/s of a square matmul in ``dtype`` on ``device`` (cached per process). The inputs
    come from a private generator: the probe never moves the global RNG (a resumed run draws the
    same dropout masks as an uninterrupted one)."""
    n = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, caches, clocks
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(5 if device.type == "cpu" else 10):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_name() -> str:
    """The CPU's model name (for benchmark headers): /proc/cpuinfo on Linux, else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
