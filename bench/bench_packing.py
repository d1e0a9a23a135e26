"""Packed vs padded SFT batches: training throughput in real (non-padding) tokens per second.

    python bench/bench_packing.py                      # demo dialogs and a long-tailed set, this CPU
    python bench/bench_packing.py --steps 20 --threads 2 --json results.jsonl
    python bench/bench_packing.py --threads 1 --clock cpu     # CPU seconds: steadier on a shared machine

Both sets are rendered with a char tokenizer (speed does not depend on the vocabulary's origin) for
the chat_small shape (4 x 128, block 256, random weights): the demo dialogs of
``data/make_dialogs.py``, and a long-tailed set of the same dialogs where one in ten is several
dialogs concatenated (lengths from ~40 up to block_size). Each timed step is a forward and backward
of ``--rows`` rows: padded rows hold one dialog each (``DialogBatches``, sorted by length in groups),
packed rows several (``PackedDialogBatches``, document-masked attention). Reported: positions run
(rows x width), the share that is padding, steps/s, and real tokens/s, the figure that matters.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.data.dialogs import Dialog
from gpt.data.sft import DialogBatches, PackedDialogBatches, render_all
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer
from gpt.typed_config import REPO_ROOT


def demo_dialogs(n: int, long_tail: bool) -> list[list[dict]]:
    spec = importlib.util.spec_from_file_location("make_dialogs", REPO_ROOT / "data" / "make_dialogs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    dialogs = gen.generate(n, 0.0, seed=0)[0]
    if not long_tail:
        return dialogs
    rng, out = random.Random(0), []
    for d in dialogs:  # one in ten: several dialogs as one long conversation
        if rng.random() < 0.1:
            d = d + [
                m for extra in rng.sample(dialogs, rng.randint(2, 6)) for m in extra if m["role"] != "system"
            ]
        out.append(d)
    return out


def measure(model: GPT, source, rows: int, steps: int, clock=time.perf_counter) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = positions = 0
    for step in range(steps + 1):  # step 0 warms up, untimed
        if step == 1:
            t0 = clock()
        batch = source.get(step, rows, 0, rows)
        x, y = batch[0], batch[1]
        loss = model(x, y, doc_ids=batch[2]) if len(batch) == 3 else model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            order = source.order(step, rows)  # the dialogs of this step: one per row, or a list per row
            real += (
                sum(int(source.lengths[r].sum()) for r in order)
                if len(batch) == 3
                else int(source.lengths[order].sum())
            )
            positions += x.numel()
    dt = clock() - t0
    return {
        "positions": positions,
        "padding": round(1 - real / positions, 3),
        "steps_per_s": round(steps / dt, 3),
        "seconds": round(dt, 2),
        "real_tokens_per_s": round(real / dt),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_packing.py", description=__doc__.splitlines()[0])
    p.add_argument("--dialogs", type=int, default=2000)
    p.add_argument("--rows", type=int, default=16, help="rows per step (train.batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, steadier on a shared machine (use with --threads 1)",
    )
    p.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    block = 256
    results = []
    for name, long_tail in (("demo", False), ("long-tailed", True)):
        dialogs = demo_dialogs(a.dialogs, long_tail)
        tok = char_tokenizer(m["content"] + " User: Assistant: System:\n" for d in dialogs for m in d)
        ex, _, _ = render_all(tok, [Dialog(d, str(i)) for i, d in enumerate(dialogs)], block, [])
        lengths = sorted(len(ids) - 1 for ids, _ in ex)
        for packing in (False, True):
            torch.manual_seed(0)
            shape = dict(n_layer=4, n_head=4, n_embd=128, bias=False, norm="rmsnorm", pos_emb="rope")
            model = GPT(GPTConfig(block_size=block, vocab_size=128, **shape))
            source = (
                PackedDialogBatches(ex, 0, tok.eot_id, block) if packing else DialogBatches(ex, 0, tok.eot_id)
            )
            clock = time.process_time if a.clock == "cpu" else time.perf_counter
            r = measure(model, source, a.rows, a.steps, clock)
            row = {"set": name, "packing": packing, "median_len": lengths[len(lengths) // 2],
                   "max_len": lengths[-1], **r, "threads": a.threads, "clock": a.clock,
                   "machine": platform.processor() or platform.machine()}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
