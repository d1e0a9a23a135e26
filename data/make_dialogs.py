"""Generate the demo dialogs for instruction tuning: answers that can be checked, and a held-out split.

    python data/make_dialogs.py                     # -> data/chat/demo.jsonl (a few seconds)
    python data/make_dialogs.py --dialogs 5000 --out /tmp/small.jsonl --seed 1
    python data/make_dialogs.py --pairs             # -> data/chat/pairs.jsonl: preference pairs for DPO
    python data/make_dialogs.py --tools             # -> data/chat/tools.jsonl: arithmetic with a calculator
    python data/make_dialogs.py --direct            # -> data/chat/direct.jsonl: the same, without it

One JSON dialog per line (gpt.chat's format); every assistant message also carries its "task":

- arithmetic: "What is 47 + 85?" -> "7+5=12, 4+8+1=13, so 132": addition and subtraction of two-digit
  numbers, worked column by column from the right with the carry (or borrow) written out, then the
  result. A small model learns this far faster than the bare result, whose first digit already
  depends on every column (digits are one token each in the BPE tokenizers trained here);
- recall:     the user states a name or a number, and asks for it back after 0 or 1 other exchanges;
- greeting:   the reply to that statement ("Nice to meet you, Ada!"), which repeats it;
- identity:   "Who are you?" -> "I am Quill, a small chat model." (or the name a system prompt gives).

With ``--pairs`` each dialog becomes a preference pair (``gpt.data.preference``): the conversation up
to its last reply, that reply as "chosen" and a plausible wrong one as "rejected" (an addition that
forgets its carry or a subtraction its borrow, a result off by ten, another name or number, another
bot name), from a different seed than the SFT dialogs.

With ``--tools`` (default --out tools.jsonl) the dialogs are arithmetic beyond memorisation, answered
with the built-in calculator (``gpt.infer.tools``) in OpenAI's messages format: a user asks a product
of two 3-digit numbers or a sum of three 3-digit numbers ("product", "sum"); the assistant calls
``calculator`` (``tool_calls``), the ``tool`` message brings the result, and the assistant states it:
"The answer is 56088.". ``--direct`` (default --out direct.jsonl) writes the same problems, same split,
answered directly without the tool: the comparison a same-size model is tuned on.

The last ``--val-fraction`` of the lines (10%, matching ``data.val_fraction``) is the held-out split
that training validates on and ``gpt eval dialogs`` scores: its arithmetic problems never occur
in the training part (names and numbers are drawn at random for both parts).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

NAMES = ["Ada", "Alan", "Alice", "Anna", "Ben", "Bob", "Carl", "Clara", "Dan", "David", "Emma", "Eva",
         "Frank", "Grace", "Hanna", "Henry", "Ivan", "Jack", "James", "Jane", "John", "Kate", "Leo",
         "Lucy", "Mark", "Mary", "Max", "Mia", "Nina", "Noah", "Oscar", "Paul", "Peter", "Rosa", "Ruth",
         "Sam", "Sara", "Tom", "Vera", "Will"]  # fmt: skip
BOT_NAMES = ["Ada", "Atlas", "Echo", "Iris", "Luna", "Nova", "Orion", "Sage", "Vega", "Zed"]
DEFAULT_BOT = "Quill"
PLAIN_SYSTEMS = ["You are a helpful assistant.", "Answer briefly and exactly.", "Be concise."]
IDENTITY_QUESTIONS = ["Who are you?", "What is your name?", "What are you?", "Tell me about yourself."]
ARITHMETIC = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"]
TOOL_QUESTIONS = ["What is {}?", "Compute {}.", "{} = ?", "Calculate {}."]


def worked(a: int, op: str, b: int) -> str:
    """The column-by-column answer: "7+5=12, 4+8+1=13, so 132" / "12-5=7, 3-1-1=1, so 17"."""
    steps, carry = [], 0
    for x, y in zip(map(int, reversed(str(a))), map(int, reversed(str(b).zfill(len(str(a))))), strict=True):
        if op == "+":
            steps.append(f"{x}+{y}{'+1' if carry else ''}={x + y + carry}")
            carry = (x + y + carry) // 10
        else:  # borrow ten when the column would go negative
            borrow = int(x - carry < y)
            steps.append(f"{10 * borrow + x}-{y}{'-1' if carry else ''}={10 * borrow + x - y - carry}")
            carry = borrow
    return f"{', '.join(steps)}, so {a + b if op == '+' else a - b}"


def arithmetic(rng: random.Random, held_out: set, is_val: bool) -> tuple[str, str]:
    """One (question, answer); a problem of the held-out set is never used for training."""
    while True:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a  # results stay >= 0
        if is_val:
            held_out.add((a, op, b))
            break
        if (a, op, b) not in held_out:
            break
    question = rng.choice(ARITHMETIC).format(a=a, op=op, b=b)
    return question, worked(a, op, b)


def dialog(rng: random.Random, held_out: set, is_val: bool) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    bot = DEFAULT_BOT
    r = rng.random()
    if r < 0.2:
        bot = rng.choice(BOT_NAMES)
        messages.append({"role": "system", "content": f"You are {bot}, a helpful assistant."})
    elif r < 0.35:
        messages.append({"role": "system", "content": rng.choice(PLAIN_SYSTEMS)})

    def turn(user: str, reply: str, task: str) -> None:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply, "task": task})

    def filler() -> None:
        if rng.random() < 0.75:
            turn(*arithmetic(rng, held_out, is_val), "arithmetic")
        else:
            turn(rng.choice(IDENTITY_QUESTIONS), f"I am {bot}, a small chat model.", "identity")

    kind = rng.random()
    if kind < 0.35:  # recall: state something, talk about something else, ask for it back
        if rng.random() < 0.5:
            name = rng.choice(NAMES)
            turn(f"My name is {name}.", f"Nice to meet you, {name}!", "greeting")
            for _ in range(rng.randint(0, 1)):
                filler()
            turn("What is my name?", f"Your name is {name}.", "recall")
        else:
            number = rng.randint(10, 999)
            turn(f"Please remember the number {number}.", f"OK, I will remember {number}.", "greeting")
            for _ in range(rng.randint(0, 1)):
                filler()
            turn("What number did I ask you to remember?", f"The number is {number}.", "recall")
    else:
        for _ in range(rng.choice([1, 1, 1, 2])):
            filler()
    return messages


def generate(n_dialogs: int, val_fraction: float, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) dialogs; the held-out ones are drawn first so training can avoid them."""
    rng = random.Random(seed)
    n_val = round(n_dialogs * val_fraction)
    held_out: set = set()
    val = [dialog(rng, held_out, True) for _ in range(n_val)]
    train = [dialog(rng, held_out, False) for _ in range(n_dialogs - n_val)]
    return train, val


def tool_problem(rng: random.Random) -> tuple[str, str, int]:
    """(task, expression, value): a 3-digit by 3-digit product, or a sum of three 3-digit numbers
    (some subtracted, never the first), as "123 * 456" / "234 + 567 - 890"."""
    if rng.random() < 0.5:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return "product", f"{a} * {b}", a * b
    terms = [rng.randint(100, 999) for _ in range(3)]
    signs = [rng.choice("+-") for _ in terms[1:]]
    value = terms[0] + sum(t if sign == "+" else -t for sign, t in zip(signs, terms[1:], strict=True))
    expression = str(terms[0]) + "".join(f" {sign} {t}" for sign, t in zip(signs, terms[1:], strict=True))
    return "sum", expression, value


def tool_dialog(rng: random.Random, held_out: set, is_val: bool, use_tool: bool) -> list[dict]:
    """One problem answered with a calculator call (or, without ``use_tool``, directly); the held-out
    problems are never used for training."""
    while True:
        task, expression, value = tool_problem(rng)
        if is_val:
            held_out.add(expression)
            break
        if expression not in held_out:
            break
    result = str(value)
    messages: list[dict] = []
    if rng.random() < 0.15:
        messages.append({"role": "system", "content": rng.choice(PLAIN_SYSTEMS)})
    spaced = rng.random() < 0.7  # "123*456" as users also write it
    asked = expression if spaced else expression.replace(" ", "")
    messages.append({"role": "user", "content": rng.choice(TOOL_QUESTIONS).format(asked)})
    answer = f"The answer is {result}."
    if use_tool:
        # the expression as the user wrote it: the call copies it verbatim, which a small model learns
        # far sooner than a copy that also respaces it (0% held-out exact match after 2,000 steps)
        arguments = json.dumps({"expression": asked})  # a JSON string, as OpenAI sends it
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "calculator", "arguments": arguments},
        }
        messages.append({"role": "assistant", "content": None, "tool_calls": [call], "task": task})
        messages.append({"role": "tool", "tool_call_id": "call_1", "content": result})
    messages.append({"role": "assistant", "content": answer, "task": task})
    return messages


def generate_tools(n_dialogs: int, val_fraction: float, seed: int, use_tool: bool) -> tuple[list, list]:
    """(train, held-out) tool dialogs; the same seed gives the same problems with or without the tool."""
    rng = random.Random(seed)
    n_val = round(n_dialogs * val_fraction)
    held_out: set = set()
    val = [tool_dialog(rng, held_out, True, use_tool) for _ in range(n_val)]
    train = [tool_dialog(rng, held_out, False, use_tool) for _ in range(n_dialogs - n_val)]
    return train, val


def wrong_reply(rng: random.Random, messages: list[dict[str, str]]) -> str:
    """A plausible wrong version of the last reply of ``messages``."""
    reply, task = messages[-1]["content"], messages[-1]["task"]
    if task == "arithmetic":
        a, op, b = re.search(r"(\d+) ([+-]) (\d+)", messages[-2]["content"]).groups()
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        careless = int(
            str(int(a[0]) + int(b[0]) if op == "+" else int(a[0]) - int(b[0]))  # no carry/borrow
            + str((int(a[1]) + int(b[1])) % 10 if op == "+" else (int(a[1]) - int(b[1])) % 10)
        )
        wrong = careless if careless != right else right + rng.choice([-10, 10])
        return reply.rsplit("so ", 1)[0] + f"so {wrong}"
    if task in ("recall", "greeting"):
        found = re.search(r"\d+", reply)
        if found:
            n = int(found.group())
            return reply.replace(str(n), str(n + rng.choice([-1, 1, 10, -10, 100])))
        name = re.search(r"([A-Z][a-z]+)[.!]$", reply).group(1)
        return reply.replace(name, rng.choice([n for n in NAMES if n != name]))
    bot = re.search(r"I am (\w+)", reply).group(1)  # identity
    return reply.replace(bot, rng.choice([n for n in [DEFAULT_BOT, *BOT_NAMES] if n != bot]))


def pair(rng: random.Random, messages: list[dict[str, str]]) -> dict:
    """{"prompt", "chosen", "rejected"}: the dialog's last reply against a wrong one."""
    return {
        "prompt": messages[:-1],
        "chosen": messages[-1]["content"],
        "rejected": wrong_reply(rng, messages),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python data/make_dialogs.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "chat" / "demo.jsonl"))
    p.add_argument("--dialogs", type=int, default=30000, help="dialogs in all (train + held-out)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, at the end of the file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", action="store_true", help="write preference pairs (default --out pairs.jsonl)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--tools",
        action="store_true",
        help="arithmetic beyond memorisation with calculator calls (default --out tools.jsonl)",
    )
    kind.add_argument(
        "--direct",
        action="store_true",
        help="--tools' problems answered without the tool (default --out direct.jsonl)",
    )
    a = p.parse_args(argv)
    if a.pairs and (a.tools or a.direct):
        p.error("--pairs makes pairs of the demo dialogs; it does not combine with --tools or --direct")
    if a.out == p.get_default("out") and (a.pairs or a.tools or a.direct):
        name = "pairs" if a.pairs else "tools" if a.tools else "direct"
        a.out = str(Path(a.out).with_name(f"{name}.jsonl"))
        a.dialogs = min(a.dialogs, 3000) if a.pairs else a.dialogs
    if a.tools or a.direct:
        train, val = generate_tools(a.dialogs, a.val_fraction, a.seed, a.tools)
    else:
        # pairs come from another seed: their conversations are not the SFT dialogs themselves (the
        # held-out arithmetic of each file is kept out of its own training part)
        train, val = generate(a.dialogs, a.val_fraction, a.seed + 1 if a.pairs else a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    with open(out, "w", encoding="utf-8") as f:
        for messages in train + val:
            f.write(json.dumps(pair(rng, messages) if a.pairs else {"messages": messages}) + "\n")
    what = "preference pairs" if a.pairs else "dialogs"
    print(f"wrote {out}: {len(train)} training {what}, then {len(val)} held-out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
