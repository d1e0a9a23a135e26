"""Llama-family benchmark on a SmolLM2-135M-shaped model: LoRA and full fine-tuning through the real
trainer (tokens/s, peak memory), KV-cache bytes per token and decode speed with grouped-query attention
against the same model without it, and our logits against transformers' as a sanity line.

    python bench/bench_llama.py                                  # everything, on this CPU (~6 min on 2 cores)
    python bench/bench_llama.py --steps 24 --batch 4 --block 256 --json results.jsonl
    python bench/bench_llama.py --skip-full --keep out/smollm2-random   # keep the folder for README commands

The model is built by transformers (LlamaConfig as SmolLM2-135M's: 30 layers, hidden 576, intermediate
1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings, rope_theta 100000; random init, seed 0) and
saved with save_pretrained to a temporary directory (or --keep DIR), beside a byte-level BPE
tokenizer.json trained by the `tokenizers` library on data/tinyshakespeare/input.txt. That small corpus
yields fewer than 49152 tokens: the model keeps SmolLM2's 49152 embedding rows (its compute and memory
are the real model's) and the ids past the tokenizer's are never produced by the data. Random weights:
speed does not depend on them.

Measured:
- (a) ``train.py experiment=finetune init_from=hf:DIR finetune.method=lora|full data=text
  data.path=data/tinyshakespeare/input.txt`` for --steps steps of --batch x --block tokens, each run in
  its own process: the median tok/s of the step lines after the first --warmup steps, and the process's
  peak RSS (its ru_maxrss from os.wait4, which includes loading the model and preparing the text);
- (b) the KV cache's bytes per token (gpt.infer.engine.KVCache: the sum over its tensors' bytes / its
  block_size / its batch) for n_kv_head = 3 (GQA 3:1) and n_kv_head = n_head = 9, fp32, and greedy decode
  tokens/s (a --prompt-tokens prompt, then --new-tokens single-token steps with the cache) at batch 1 and 8,
  fp32, the median of --repeats runs;
- (c) max |our logits - transformers' logits| for a random 64-token prompt, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.device import cpu_name
from gpt.infer.engine import Decoder, KVCache
from gpt.interop.hf import import_hf
from gpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "data" / "tinyshakespeare" / "input.txt"
SMOLLM2 = dict(  # SmolLM2-135M's config.json, less its name and token ids
    num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
)  # fmt: skip
STEP = re.compile(r"step\s+(\d+)/\d+ \| .*?\| ([\d,]+) tok/s")


def save_tokenizer(directory: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) trained on Tiny Shakespeare,
    with <|endoftext|> as SmolLM2's base model has; returns its size."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(TEXT)], trainer)
    eot = "<|endoftext|>"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot
    )
    fast.save_pretrained(str(directory))
    return tok.get_vocab_size()


def build(directory: Path):
    """Save the random SmolLM2-shaped model and its tokenizer to directory: (the model, tokenizer size)."""
    import transformers

    n_tokens = save_tokenizer(directory, SMOLLM2["vocab_size"])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    return model, n_tokens


def finetune(directory: Path, method: str, args, out_dir: Path) -> dict:
    """One train.py run in its own process: median tok/s after the warmup steps and its peak RSS."""
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=finetune", f"init_from=hf:{directory}",
           f"finetune.method={method}", "data=text", f"data.path={TEXT}", f"out_dir={out_dir}",
           f"model.block_size={args.block}", f"train.batch_size={args.batch}",
           f"train.max_steps={args.steps}",
           "train.log_interval=1", f"train.eval_interval={args.steps}", "train.eval_steps=1",
           f"train.ckpt_interval={args.steps}", "train.progress=false"]  # fmt: skip
    if method == "lora":
        cmd.append("optim.lr=1e-3")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(output[-3000:], file=sys.stderr)
        raise SystemExit(f"train.py {method} failed (exit {proc.returncode}): {' '.join(cmd)}")
    rates = [float(r.replace(",", "")) for s, r in STEP.findall(output) if int(s) > args.warmup]
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"method": method, "steps": args.steps, "batch": args.batch, "block": args.block,
            "tok_s": statistics.median(rates), "peak_rss_gib": usage.ru_maxrss * scale / 2**30,
            "command": " ".join(cmd[1:])}  # fmt: skip


def cache_bytes_per_token(config: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes the KV cache holds per token, from its real tensors (batch 1)."""
    cache = KVCache(config, 1, torch.device("cpu"), dtype)
    total = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    return total // config.block_size


@torch.inference_mode()
def decode_tok_s(model: GPT, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """Greedy decode tokens/s (all rows) with the KV cache, after a prompt_tokens prefill."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (batch, prompt_tokens), generator=gen)
    decoder = Decoder(model, batch)
    next_ids = decoder.prefill(prompt).argmax(-1)  # (batch,)
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_ids = decoder.step(next_ids).argmax(-1)
        next_ids.tolist()  # the engine reads every token
    return batch * new_tokens / (time.perf_counter() - start)


def kv_and_decode(directory: Path, args) -> list[dict]:
    """(b): the imported model (GQA) and the same shape with n_kv_head = n_head (random weights). Each
    decode speed is the median of --repeats runs, the models taking turns (a shared machine's load
    then falls on both), after one untimed warm-up run each."""
    config, state_dict, _ = import_hf(directory, with_tokenizer=False)
    config = replace(config, block_size=args.prompt_tokens + args.new_tokens + 1)
    rows, models = [], []
    for kv in (config.n_kv_head, config.n_head):
        c = replace(config, n_kv_head=kv)
        torch.manual_seed(0)
        model = GPT(c).eval()
        if kv == config.n_kv_head:
            model.load_state_dict(state_dict)
        decode_tok_s(model, 1, args.prompt_tokens, 4)  # warm-up
        models.append(model)
        rows.append({"n_kv_head": kv, "kv_bytes_per_token": cache_bytes_per_token(c, torch.float32),
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6})  # fmt: skip
    for b in (1, 8):
        runs = [[] for _ in models]
        for _ in range(args.repeats):
            for model, times in zip(models, runs):
                times.append(decode_tok_s(model, b, args.prompt_tokens, args.new_tokens))
        for row, times in zip(rows, runs):
            row[f"decode_tok_s_b{b}"] = statistics.median(times)
    return rows


@torch.no_grad()
def logits_diff(directory: Path, ref) -> float:
    """(c): max |ours - transformers'| over a random 64-token prompt, fp32."""
    config, state_dict, _ = import_hf(directory, with_tokenizer=False)
    model = GPT(config).eval()
    model.load_state_dict(state_dict)
    idx = torch.randint(0, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ours, theirs = model(idx)[..., : ref.config.vocab_size], ref(idx).logits  # (1, 64, vocab)
    return (ours - theirs).abs().max().item()


def report(result: dict) -> None:
    print(f"\n{result['machine']}, {result['threads']} threads, tokenizer {result['tokenizer_size']} tokens")
    print(f"{'fine-tuning':<12} {'tok/s':>8} {'peak RSS GiB':>13}")
    for r in result["finetune"]:
        print(f"{r['method']:<12} {r['tok_s']:>8.0f} {r['peak_rss_gib']:>13.2f}")
    head = ("n_kv_head", "params M", "KV B/token", "decode b1 tok/s", "decode b8 tok/s")
    print("\n{:<10} {:>9} {:>11} {:>16} {:>16}".format(*head))
    for r in result["kv"]:
        print(f"{r['n_kv_head']:<10} {r['params_m']:>9.1f} {r['kv_bytes_per_token']:>11,} "
              f"{r['decode_tok_s_b1']:>16.1f} {r['decode_tok_s_b8']:>16.1f}")  # fmt: skip
    print(f"\nmax |ours - transformers| logits (fp32): {result['max_logit_diff']:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="training steps per fine-tuning run")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the tok/s median")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--block", type=int, default=256, help="tokens per sequence")
    p.add_argument("--skip-full", action="store_true", help="LoRA only (full: ~1 GiB more)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="decode runs per model and batch (median)")
    p.add_argument("--keep", type=Path, help="build the model folder here and keep it")
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp) / "smollm2-135m-random"
        ref, n_tokens = build(directory)
        result = {"bench": "llama", "machine": cpu_name(), "threads": torch.get_num_threads(),
                  "tokenizer_size": n_tokens, "max_logit_diff": logits_diff(directory, ref)}  # fmt: skip
        del ref
        result["kv"] = kv_and_decode(directory, args)
        methods = ["lora"] if args.skip_full else ["lora", "full"]
        result["finetune"] = [finetune(directory, m, args, Path(tmp) / f"run-{m}") for m in methods]
    report(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
