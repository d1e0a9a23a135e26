"""Estimated vs measured peak memory of one training step on this CPU (fp32, AdamW), for the
planner's estimate (gpt.train.memory.step_bytes). Each shape runs in a fresh process: the measured
peak is the process's resident high-water mark (ru_maxrss) during two training steps (forward,
backward, clip, AdamW) minus its resident memory before the model was built.

    python bench/memory_estimate.py            # tiny, shakespeare_char and gpt2 shapes
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

SHAPES = {  # name: (GPTConfig keys, micro-batch)
    "tiny": (dict(block_size=32, n_layer=2, n_head=2, n_embd=32, norm="rmsnorm", activation="gelu_tanh",
                  vocab_size=128), 256),
    "shakespeare_char": (dict(block_size=128, n_layer=4, n_head=4, n_embd=128, bias=False, pos_emb="rope",
                              tie_embeddings=True, activation="relu2", vocab_size=128), 16),
    "gpt2": (dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True, pos_emb="learned",
                  activation="gelu_tanh"), 1),
}


def measure(name: str) -> dict:
    """In this process: one shape's estimate and its measured peak (bytes)."""
    import torch

    from gpt.config import OptimConfig
    from gpt.model import GPT, GPTConfig
    from gpt.train.memory import step_bytes
    from gpt.train.optim import clip_gradients, configure_optimizer

    keys, mbs = SHAPES[name]
    config = GPTConfig(**keys)
    x = torch.randint(0, config.vocab_size, (mbs, config.block_size))
    warm = GPT(GPTConfig(**{**keys, "n_layer": 1, "block_size": 8, "vocab_size": 64}))
    for _ in range(2):  # the libraries' first-call set-up (thread pools, kernels) is not the step's
        w = torch.randint(0, 64, (1, 8))
        warm(w, w).backward()
        configure_optimizer(warm, OptimConfig(), "cpu").step()
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    model = GPT(config)
    optimizer = configure_optimizer(model, OptimConfig(), "cpu")
    for _ in range(2):
        model(x, x).backward()
        clip_gradients(model, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    est = step_bytes(config, mbs, torch.float32, torch.device("cpu"))
    return {"shape": name, "micro_batch": mbs, "estimate": est, "measured": peak}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(measure(sys.argv[1])))
        return
    print("| shape | micro-batch | estimate MiB | measured MiB | error |\n| --- | --- | --- | --- | --- |")
    for name in SHAPES:
        out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        err = (r["estimate"] - r["measured"]) / r["measured"]
        print(f"| {name} | {r['micro_batch']} | {r['estimate'] / 2**20:,.1f} | {r['measured'] / 2**20:,.1f} "
              f"| {err:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
