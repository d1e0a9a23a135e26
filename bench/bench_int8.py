"""Int8 weight-only decode (gpt.quant) against bf16: batch-1 tokens/s of one random GPT-2-124M-shaped
model, every variant in one process, measured in alternating rounds (a shared, noisy machine slows
them alike), medians reported; greedy tokens of each variant compared with bf16's.

    python bench/bench_int8.py                         # 2 threads, 16-token prompt, 64 new tokens, 5 rounds
    python bench/bench_int8.py --threads 1 --rounds 7 --new-tokens 128   # steadier on a loaded machine
    python bench/bench_int8.py --batch 16              # the batch of 16 rows (int8 dequantizes there)

Variants (all with bf16 activations):
- bf16: the model as sample.py dtype=bf16 runs it;
- int8: quantize=int8 (every linear layer and the output head in int8, torch's int8 GEMV per step);
- int8 float head: the same with the output head left in bf16 (does quantizing the head pay?);
- int8 dequant: every layer dequantizes its int8 weight then multiplies (the plain baseline);
- fp32 and int8 fp32 (with --fp32): fp32 activations, where int8 always dequantizes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpt.quant as quant
from gpt.infer.engine import Decoder
from gpt.model import GPT, GPTConfig


def gpt2_124m() -> GPT:
    """conf/model/gpt2.yaml's shape with random weights (speed does not depend on them)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50304, bias=True,
                       pos_emb="learned", activation="gelu_tanh", norm="layernorm")  # fmt: skip
    return GPT(config).eval()


def variants(model: GPT, fp32: bool) -> dict[str, tuple[GPT, int]]:
    """name -> (model, GEMV_ROWS to run it with); the fp32 original is consumed last."""
    int8 = quant.quantize_model(copy.deepcopy(model), "int8")
    head = copy.deepcopy(int8)
    head.lm_head = nn.Linear(768, model.config.vocab_size, bias=False)
    head.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    found = {"bf16": (copy.deepcopy(model).to(torch.bfloat16), quant.GEMV_ROWS),
             "int8": (copy.deepcopy(int8).to(torch.bfloat16), quant.GEMV_ROWS),
             "int8 float head": (head.to(torch.bfloat16), quant.GEMV_ROWS),
             "int8 dequant": (copy.deepcopy(int8).to(torch.bfloat16), 0)}  # fmt: skip
    if fp32:
        found |= {"fp32": (model, quant.GEMV_ROWS), "int8 fp32": (int8, quant.GEMV_ROWS)}
    return found


@torch.no_grad()
def decode(model: GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decode with the KV cache: (tokens/s of the steps after the prefill, row 0's tokens)."""
    decoder = Decoder(model, prompt.size(0))
    nxt = decoder.prefill(prompt).argmax(-1)  # (rows,)
    tokens = [int(nxt[0])]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = decoder.step(nxt).argmax(-1)
        tokens.append(int(nxt[0]))
    return prompt.size(0) * (new_tokens - 1) / (time.perf_counter() - t0), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="also fp32 activations (plain and int8)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = variants(gpt2_124m(), args.fp32)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50257, (args.batch, args.prompt_tokens), generator=gen)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    default_rows = quant.GEMV_ROWS
    for r in range(args.rounds + 1):  # round 0 warms up (allocations, kernels) and is not counted
        for name, (model, rows) in models.items():
            quant.GEMV_ROWS = rows
            speed, tokens[name] = decode(model, prompt, args.new_tokens)
            if r:
                speeds[name].append(speed)
        quant.GEMV_ROWS = default_rows
    base = statistics.median(speeds["bf16"])
    print(f"GPT-2 124M shape, batch {args.batch}, {args.threads} threads, {args.new_tokens} new tokens, "
          f"medians of {args.rounds} alternating rounds")  # fmt: skip
    print("| variant | tok/s | vs bf16 | greedy tokens = bf16's |\n|---|---|---|---|")
    for name, runs in speeds.items():
        same = sum(a == b for a, b in zip(tokens[name], tokens["bf16"], strict=True))
        print(f"| {name} | {statistics.median(runs):.1f} | {statistics.median(runs) / base:.2f}x | "
              f"{same}/{len(tokens['bf16'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
