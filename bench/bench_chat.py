"""Chat benchmark: time per turn over a 20-turn conversation, with the chat REPL keeping its KV cache
across turns (only the new user turn and the last reply are run) against re-encoding the whole
history every turn.

    python bench/bench_chat.py                                  # 4x128, block 1024, on this CPU
    python bench/bench_chat.py --turns 20 --block-size 1024 --n-layer 6 --n-embd 384 --device cuda

Random weights (speed does not depend on them) and a char-level vocabulary; every reply is exactly
--reply-tokens long (no stop token), so both runs see the same conversation lengths. Printed per
turn: the prompt length, the tokens the prefill ran with reuse, and the milliseconds per turn of each
run; then the medians over the turns after the first, and over the last five (where the history is
longest). A history that outgrows the context drops its oldest exchanges: the reuse then keeps the
common prefix (the system prompt) and re-fills the rest.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.infer.chat_repl import ChatRepl
from gpt.infer.config import GenerationConfig
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer

TEXT = "System: User: Assistant: abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,?!'<|>_\n"


class TimedChat(ChatRepl):
    """The chat REPL with replies of a fixed length and the time of each turn recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[int, int, float]] = []  # (prompt tokens, tokens run, seconds)

    def stop_token_ids(self):
        return ()

    def turn(self, text: str) -> bool:
        start = time.perf_counter()
        ok = super().turn(text)
        seconds = time.perf_counter() - start
        prompt = self._last_prompt
        ran = prompt - (self._decoder.reused if self._decoder is not None else 0)
        self.rows.append((prompt, ran, seconds))
        return ok

    def prompt_ids(self, text: str) -> list[int]:
        ids = super().prompt_ids(text)
        self._last_prompt = len(ids)
        return ids


def run(args: argparse.Namespace, reuse: bool) -> list[tuple[int, int, float]]:
    torch.manual_seed(0)
    tok = char_tokenizer([TEXT])
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size, vocab_size=tok.vocab_size)  # fmt: skip
    model = GPT(config).to(args.device).eval()
    settings = GenerationConfig(max_new_tokens=args.reply_tokens, temperature=0.8, top_k=0, seed=1)
    lines = iter([f"Question number {i}, about the weather and the sea?" for i in range(args.turns)])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    chat = TimedChat(model, tok, settings, input_fn=read, out=io.StringIO(), err=io.StringIO(),
                     system="You are a brief assistant.", reuse_cache=reuse)  # fmt: skip
    chat.run()
    errors = [line for line in chat.err.getvalue().splitlines() if line.startswith("error")]
    if errors:
        raise SystemExit(f"the chat failed: {errors[0]}")
    return chat.rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}; model {args.n_layer}x{args.n_embd}, "
          f"block {args.block_size}, {args.reply_tokens}-token replies")  # fmt: skip
    kept, fresh = run(args, reuse=True), run(args, reuse=False)
    print("turn  prompt  ran(kept)  ms(kept)  ms(re-encode)")
    for i, ((prompt, ran, t_kept), (_, _, t_fresh)) in enumerate(zip(kept, fresh, strict=True), 1):
        print(f"{i:4d}  {prompt:6d}  {ran:9d}  {1000 * t_kept:8.1f}  {1000 * t_fresh:13.1f}")
    for label, part in (("turns 2+", slice(1, None)), ("last 5", slice(-5, None))):
        a = statistics.median(t for _, _, t in kept[part]) * 1000
        b = statistics.median(t for _, _, t in fresh[part]) * 1000
        print(f"median ms per turn, {label}: kept cache {a:.1f}, re-encode {b:.1f} ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
