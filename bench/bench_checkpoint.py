"""Checkpoint cost of the fault guards: writing and reading a checkpoint with its payload checksum
(sha256 over every tensor, verified on load) against a bare ``torch.save`` / ``torch.load``, for a
model's weights plus AdamW's two moments (what a training checkpoint holds).

    python bench/bench_checkpoint.py                        # the gpt2 (124M) shape, in a temp dir
    python bench/bench_checkpoint.py --model shakespeare_char --repeats 5 --dir /fast/disk

Reported, as medians over --repeats: save_s / load_s with the checksum (gpt.checkpoint), bare_save_s
/ bare_load_s without, and checksum_s, the hash alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint, payload_checksum, save_checkpoint
from gpt.model import GPT, GPTConfig

SHAPES = {
    "gpt2": dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    "shakespeare_char": dict(block_size=128, vocab_size=128, n_layer=4, n_head=4, n_embd=128),
}


def state_for(shape: str) -> dict:
    model = GPT(GPTConfig(**SHAPES[shape]))
    sd = model.state_dict()
    moments = {k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)} for k, v in sd.items()}
    return {
        "model": sd,
        "model_config": model.config.to_dict(),
        "tokenizer": {},
        "optimizer": {"state": moments},
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    state = state_for(args.model)
    n_bytes = sum(t.numel() * t.element_size() for t in state["model"].values()) * 3
    rows: dict[str, list[float]] = {
        k: [] for k in ("save_s", "load_s", "bare_save_s", "bare_load_s", "checksum_s")
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, bare = Path(tmp) / "ckpt.pt", Path(tmp) / "bare.pt"
        for _ in range(args.repeats):
            rows["checksum_s"].append(timed(lambda: payload_checksum(state)))
            rows["save_s"].append(timed(lambda: save_checkpoint(path, state)))
            rows["bare_save_s"].append(timed(lambda: torch.save(state, bare)))
            rows["load_s"].append(timed(lambda: load_checkpoint(path)))
            rows["bare_load_s"].append(timed(lambda: torch.load(bare, weights_only=True)))
    machine = platform.processor() or platform.machine()
    print(f"{args.model}: {n_bytes / 2**20:,.0f} MiB of tensors; {machine}, torch {torch.__version__}")
    for k, v in rows.items():
        print(f"  {k:12s} {statistics.median(v):7.2f}")


if __name__ == "__main__":
    main()
