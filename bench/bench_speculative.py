"""Speculative decoding's speed: greedy tokens/s of plain decoding against prompt-lookup drafting
(draft=ngram) and against a draft model (draft=RUN), side by side in one process, alternating, medians.

    python bench/bench_speculative.py                       # trains both char models briefly (~2 min)
    python bench/bench_speculative.py --target out/wide --draft out/shakespeare_char --tokens 200

Without --target/--draft two char models are trained on tinyshakespeare for --steps steps: a narrow
draft (2 layers, 64 wide) and a wider target (4 layers, 256 wide). The ngram task asks the target to
continue a passage it has just been shown (the prompt repeats it: a quote); the draft model's task is
to continue the openings of a few speeches of the corpus's last tenth (the validation split). Every
speculative text is checked to be plain decoding's, token for token; "per forward" is the tokens
each forward of the target produced (1 without drafts).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from gpt.device import resolve_dtype
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import compile_decode
from gpt.infer.generate import generate
from gpt.infer.speculative import ModelDrafter, NgramDrafter, drafter_from
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.tokenizer import char_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"


def train(text: str, tok, n_layer: int, n_embd: int, steps: int, seed: int = 0) -> GPT:
    """A char model trained briefly on text (AdamW, batch 16 x 128)."""
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=256, vocab_size=tok.vocab_size)
    model = GPT(config)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        i = torch.randint(len(data) - 129, (16,))
        x = torch.stack([data[j : j + 128] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + 129] for j in i.tolist()])
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  {n_layer}x{n_embd} step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


class Counted:
    """A drafter that counts its proposals (each is one forward of the target over the drafts)."""

    def __init__(self, drafter):
        self.drafter, self.k, self.calls = drafter, drafter.k, 0

    def propose(self, *args):
        self.calls += 1
        return self.drafter.propose(*args)


def timed(model: GPT, tok, prompts: list[list[int]], settings: GenerationConfig, drafter
          ) -> tuple[float, list[list[int]]]:  # fmt: skip
    """tokens/s over every prompt's continuation, and the continuations."""
    start = time.perf_counter()
    outs = [generate(model, tok, ids, settings, drafter=drafter)[0] for ids in prompts]
    return sum(map(len, outs)) / (time.perf_counter() - start), outs


def compare(name: str, model: GPT, tok, prompts: list[str], drafter, tokens: int, rounds: int) -> None:
    """Plain and speculative, alternating for ``rounds``; medians of tokens/s."""
    ids = [tok.encode(p) for p in prompts]
    settings = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    plain, spec, counted = [], [], Counted(drafter)
    warm = GenerationConfig(max_new_tokens=8, temperature=0.0)
    timed(model, tok, ids[:1], warm, drafter)  # warm-up (and the draft's compile)
    for _ in range(rounds):
        rate, want = timed(model, tok, ids, settings, None)
        plain.append(rate)
        rate, got = timed(model, tok, ids, settings, counted)
        spec.append(rate)
        assert got == want, f"{name}: speculative text differs from plain decoding's"
    p, s = statistics.median(plain), statistics.median(spec)
    per = rounds * sum(map(len, want)) / max(1, counted.calls)  # upper bound: plain steps are not counted
    print(f"{name:28s} plain {p:7.1f} tok/s   speculative {s:7.1f} tok/s   {s / p:4.2f}x  "
          f"{per:.2f} per forward (identical text)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="the target model (any gpt.runs.load reference)")
    parser.add_argument("--draft", help="the draft model (same tokenizer)")
    parser.add_argument("--steps", type=int, default=300, help="training steps when models are trained here")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=4, help="draft_tokens")
    parser.add_argument("--width", type=int, default=256, help="the trained target's n_embd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="both models'")
    parser.add_argument("--compile", action="store_true", help="compile the draft's steps (compile=true)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    text = CORPUS.read_text()
    if args.target:
        loaded = load(args.target)
        target, tok = loaded.build().eval().to(dtype), loaded.tokenizer
    else:
        tok = char_tokenizer([text])
        draft = train(text, tok, 2, 64, args.steps, seed=1).to(dtype)
        target = train(text, tok, 4, args.width, args.steps).to(dtype)
    vocab = min(tok.vocab_size, target.config.vocab_size)
    print(f"{dtype}, {args.threads} threads, {args.k} drafts, {args.tokens} tokens a prompt, "
          f"{args.rounds} rounds")  # fmt: skip
    passage = text[2000:2150]
    quote = f"{passage}\n\n{passage}\n\n{passage[:40]}"  # continue what was just quoted
    ngram = NgramDrafter(args.k, 3)
    compare("ngram, quoting the prompt", target, tok, [quote], ngram, args.tokens, args.rounds)
    if args.target and args.draft:  # as sample.py builds it: the target's device, dtype and tokenizer
        drafter = drafter_from(args.draft, args.k, 3, target, tok)
    elif not args.target:
        drafter = ModelDrafter(draft, args.k, vocab)
    else:
        return
    if args.compile:  # as sample.py's compile=true with a draft: the draft's one-token steps
        compile_decode(drafter.model)
    val = text[int(len(text) * 0.9) :]
    openings = [m.end() for m in re.finditer(r"\n\n[A-Z]+:\n", val)][::25][:4]  # 4 speeches
    prompts = [val[: val.index("\n", i) + 1][val.rindex("\n\n", 0, i) + 2 :] for i in openings]  # name, line
    compare("draft model, Shakespeare", target, tok, prompts, drafter, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
