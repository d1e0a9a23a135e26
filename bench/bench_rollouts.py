"""GRPO's rollouts: B prompts x G sampled replies decoded prompt by prompt (G rows at a time) against
all at once (``gpt.infer.generate.sample_batch`` over B x G rows, what ``gpt.train.grpo`` does), on a
chat model and a prompts file, alternating, medians. The samples are the same both ways (each
prompt's rows draw from its own generator).

    python bench/bench_rollouts.py --ckpt out/chat --prompts data/chat/prompts.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt.chat_template import render_prompt
from gpt.data.prompts import read_prompts
from gpt.infer.config import GenerationConfig
from gpt.infer.generate import sample_batch
from gpt.runs.load import load
from gpt.tokenizer import EOT_TURN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/chat")
    p.add_argument("--prompts", default="data/chat/prompts.jsonl")
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout (train.batch_size)")
    p.add_argument("--group", type=int, default=8, help="replies per prompt (grpo.group_size)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.ckpt)
    model, tok = loaded.build().eval(), loaded.tokenizer
    stop = [tok.special_id(EOT_TURN)]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=0)
    prompts = read_prompts(args.prompts)
    times: dict[str, list[float]] = {"prompt by prompt": [], "all at once": []}
    for r in range(args.rounds):
        batch = prompts[r * args.batch : (r + 1) * args.batch]
        rows = [render_prompt(tok, q.messages) for q in batch for _ in range(args.group)]
        outs = []
        for name in times:
            gens = [g for i in range(len(batch)) for g in [torch.Generator().manual_seed(i)] * args.group]
            start, n = time.perf_counter(), len(rows) if name == "all at once" else args.group
            done = []
            for s in range(0, len(rows), n):
                part = sample_batch(model, tok, rows[s : s + n], cfg, gens[s : s + n], n, stop)
                done += [c.ids for c in part]
            times[name].append(time.perf_counter() - start)
            outs.append(done)
        assert outs[0] == outs[1], "the two ways sampled different replies"
    a, b = (statistics.median(t) for t in times.values())
    print(f"{args.batch} prompts x {args.group} replies, {args.new_tokens} tokens at most, {args.threads} "
          f"threads: prompt by prompt {a:.2f} s, all at once {b:.2f} s ({a / b:.2f}x), same replies")


if __name__ == "__main__":
    main()
