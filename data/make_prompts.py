"""Arithmetic prompts with their answers, for GRPO (experiment=grpo, data=prompts).

    python data/make_prompts.py      # data/chat/prompts.jsonl: 2,000 prompts, the last 200 held out

The questions are those of the chat demo (data/make_dialogs.py: 2-digit sums and differences, the
same phrasings); each line is {"messages": [{"role": "user", ...}], "answer": "132"}. The held-out
prompts come last (data.val_fraction=0.1 holds them out) and never occur among the training ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dialogs import ARITHMETIC  # the demo's phrasings, one list


def problem(rng: random.Random) -> tuple[int, str, int]:
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    return (b, op, a) if op == "-" and b > a else (a, op, b)  # results stay >= 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python data/make_prompts.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "chat" / "prompts.jsonl"))
    p.add_argument("--prompts", type=int, default=2000, help="prompts in all (train + held-out)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, at the end of the file")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    n_val = round(args.prompts * args.val_fraction)
    val = {problem(rng) for _ in range(n_val * 2)}
    val = sorted(val)[:n_val]
    rng.shuffle(val)
    train: list[tuple[int, str, int]] = []
    while len(train) < args.prompts - len(val):
        t = problem(rng)
        if t not in val:
            train.append(t)
    lines = []
    for a, op, b in train + val:
        question = rng.choice(ARITHMETIC).format(a=a, op=op, b=b)
        answer = a + b if op == "+" else a - b
        lines.append(json.dumps({"messages": [{"role": "user", "content": question}], "answer": str(answer)}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {len(train)} train prompts, then {len(val)} held out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
