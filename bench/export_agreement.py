"""Do the exports reply as we do? A chat run's greedy replies to held-out dialogs, from our engine,
from transformers (the Hugging Face export, its chat template, ``generate``) and from llama.cpp (the
GGUF export in f32 and q8_0, ``create_chat_completion`` at temperature 0: what a user of either runs).

    python bench/export_agreement.py out/chat                       # the README chat tour's model
    python bench/export_agreement.py out/chat --dialogs 200 --json agreement.jsonl

The dialogs are the last --dialogs of data/chat/demo.jsonl (data/make_dialogs.py holds out its last
3,000), each cut before its last assistant reply. Ours: ``greedy_batch`` (the decode of ``sample.py
mode=chat temperature=0`` and ``gpt eval dialogs``) in fp32, stopping at the end of a turn. Printed per
path: replies identical to ours, exact matches with the dialog's reference reply, and wall time. Needs
transformers and llama-cpp-python (pip install -e ".[llama]").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gpt.chat_template import render_prompt
from gpt.infer.generate import greedy_batch
from gpt.interop.gguf import export_gguf
from gpt.interop.hf import export_hf
from gpt.interop.tokenizer_export import turn_end_id
from gpt.runs.load import load


def held_out(path: Path, n: int) -> list[tuple[list[dict], str]]:
    """(messages up to the last user turn, the reference reply) of the last ``n`` dialogs."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[-n:]:
        messages = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append((messages[:last], messages[last]["content"].strip()))
    return out


def ours(model, tokenizer, cases, max_new: int) -> list[str]:
    prompts = [render_prompt(tokenizer, history) for history, _ in cases]
    stops = [turn_end_id(tokenizer), tokenizer.eot_id]
    return [c.text.strip() for c in greedy_batch(model, tokenizer, prompts, max_new, 16, (), stops)]


def transformers_replies(hf_dir: Path, cases, max_new: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    replies = []
    for history, _ in cases:
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)  # fmt: skip
        with torch.no_grad():
            ids = model.generate(**prompt, do_sample=False, max_new_tokens=max_new)
        replies.append(tok.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def llama_cpp_replies(gguf_file: Path, cases, max_new: int, n_ctx: int) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=torch.get_num_threads(), verbose=False)
    return [llm.create_chat_completion(messages=history, temperature=0.0, max_tokens=max_new)["choices"][0]
            ["message"]["content"].strip() for history, _ in cases]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a chat run directory (or any model reference gpt.runs.load takes)")
    p.add_argument("--dialogs", type=int, default=100)
    p.add_argument("--data", default="data/chat/demo.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", help="append the results to this JSONL file")
    args = p.parse_args()
    loaded = load(args.run)
    model, tokenizer = loaded.build("cpu").eval(), loaded.tokenizer
    cases = held_out(Path(args.data), args.dialogs)
    rows, replies = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tokenizer, Path(tmp) / "hf")
        for kind in ("f32", "q8_0"):
            export_gguf(model, tokenizer, Path(tmp) / f"m-{kind}.gguf", kind)
        new = args.max_new_tokens
        paths = {
            "ours (fp32)": lambda: ours(model, tokenizer, cases, new),
            "transformers (HF export)": lambda: transformers_replies(Path(tmp) / "hf", cases, new),
            **{f"llama.cpp (GGUF {k})": (lambda k=k: llama_cpp_replies(
                Path(tmp) / f"m-{k}.gguf", cases, new, model.config.block_size))
               for k in ("f32", "q8_0")},
        }  # fmt: skip
        for name, run in paths.items():
            t0 = time.perf_counter()
            replies[name] = run()
            wall = time.perf_counter() - t0
            same = sum(a == b for a, b in zip(replies[name], replies["ours (fp32)"], strict=True))
            exact = sum(r == ref for r, (_, ref) in zip(replies[name], cases, strict=True))
            rows.append({"path": name, "dialogs": len(cases), "same_as_ours": same, "exact": exact,
                         "wall_s": wall})  # fmt: skip
    print(f"{args.run}: greedy replies to the last {len(cases)} dialogs of {args.data}\n")
    print("| path | replies identical to ours | exact match with the reference | wall |")
    print("|---|---|---|---|")
    for r in rows:
        n = r["dialogs"]
        print(f"| {r['path']} | {r['same_as_ours']}/{n} | {r['exact']}/{n} ({100 * r['exact'] / n:.1f}%) "
              f"| {r['wall_s']:.1f} s |")  # fmt: skip
    differ = [(h[-1]["content"], replies["ours (fp32)"][i], {k: v[i] for k, v in replies.items()})
              for i, (h, _) in enumerate(cases) if len({v[i] for v in replies.values()}) > 1]  # fmt: skip
    for prompt, mine, theirs in differ[:5]:
        print(f"\ndiffers: {prompt!r}: ours {mine!r}; " + "; ".join(f"{k} {v!r}" for k, v in theirs.items()))
    if args.json:
        with open(args.json, "a") as f:
            f.write("".join(json.dumps({"run": args.run, **r}) + "\n" for r in rows))


if __name__ == "__main__":
    main()
