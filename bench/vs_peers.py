"""Decode speed side by side with the peers: one seeded random GPT-2 124M loaded into ours (``hf:DIR``),
transformers' GPT2LMHeadModel and llama.cpp (llama-cpp-python, through our GGUF export), at the same
precision where both have it, on this machine, in turns.

    python bench/vs_peers.py                              # 3 rounds, 2 threads (~10 min on 2 cores)
    python bench/vs_peers.py --rounds 1 --only ours-bf16,llama-bf16 --json vs_peers.jsonl
    python bench/vs_peers.py --model llama                # a Llama-shaped model of the same size instead

The model is built by transformers (GPT2Config(), seed 0, weights perturbed so that no logit ties)
and saved with save_pretrained beside GPT-2's tokenizer files (data/gpt2); every peer loads that
folder: ours as ``hf:DIR``, transformers as is, llama.cpp from ``gpt export out=FILE.gguf`` in f32,
bf16 and q8_0. ``--model llama`` builds a LlamaForCausalLM of GPT-2 124M's size instead (12 layers,
768 wide, 12 heads, 4 KV heads, SwiGLU 2048).

Each configuration runs in its own process (its peak RSS is its own), one after another, ``--rounds``
times in turn; the table gives medians. Measured per configuration:
- decode tok/s at batch 1 and 16: a --prompt-tokens random prompt, then --new-tokens greedy tokens
  (ours: ``greedy_batch``, the decode of sample.py / eval, text streaming included; transformers:
  ``generate(do_sample=False)``; llama.cpp: ``Llama.generate`` at temperature 0, batch 1 only: its
  Python API decodes one sequence);
- time to first token for a 512-token prompt (the prefill and the first token's logits);
- peak RSS of the process (VmHWM: loading included);
- the first 32 greedy tokens at batch 1, compared with ours in fp32 (random weights: a near tie can flip
  between precisions, so agreement is reported, not asserted).
The roofline: a batch-1 step reads every weight once, so tok/s <= read bandwidth / weight bytes; the
bandwidth is measured here (the sum of a 1 GiB fp32 tensor, best of 5, --threads threads).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BYTES_PER_WEIGHT = {"fp32": 4.0, "f32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32, "int8": 1.0}
CONFIGS = ("ours-fp32", "ours-bf16", "ours-int8", "ours-bf16+compile", "ours-int8+compile", "hf-fp32",
           "hf-bf16", "llama-f32", "llama-bf16", "llama-q8_0")  # +compile: sample.py's compile=true


def build_model(directory: Path, kind: str) -> int:
    """Save the seeded random model and GPT-2's tokenizer files to ``directory``; its parameter count."""
    import transformers

    from gpt.interop.tokenizer_export import tokenizer_files
    from gpt.tokenizer_load import gpt2_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    else:
        config = transformers.LlamaConfig(vocab_size=50257, hidden_size=768, intermediate_size=2048,
                                          num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                          max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # norms away from 1, biases from 0: logits without ties
    model.save_pretrained(str(directory))
    files, _ = tokenizer_files(gpt2_tokenizer())
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return sum(p.numel() for p in model.parameters())


def export_ggufs(directory: Path) -> None:
    from gpt.interop.gguf import export_gguf
    from gpt.runs.load import load

    loaded = load(f"hf:{directory}")
    model = loaded.build()
    for kind in ("f32", "bf16", "q8_0"):
        export_gguf(model, loaded.tokenizer, directory / f"m-{kind}.gguf", kind)


def read_bandwidth() -> float:
    """GB/s reading a 1 GiB fp32 tensor (best of 5)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


# ------------------------------------------------------------------------------------------ workers
def prompts(batch: int, length: int, vocab: int = 50257) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def ours_worker(directory: Path, precision: str, args) -> dict:
    from gpt.infer.engine import Decoder, compile_decode
    from gpt.infer.generate import greedy_batch
    from gpt.runs.load import load

    compiled, precision = precision.endswith("+compile"), precision.removesuffix("+compile")
    loaded = load(f"hf:{directory}")
    quantize = "int8" if precision == "int8" else "none"  # int8 weights, bf16 activations (sample.py's)
    model = loaded.build("cpu", quantize).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    model.eval()
    tok, out = loaded.tokenizer, {}
    if compiled:  # compiled at the first steps of one row and of several: not timed
        compile_decode(model)
        for batch in (1, 16):
            greedy_batch(model, tok, prompts(batch, args.prompt_tokens), 4, batch_size=batch)
    for batch in (1, 16):
        t0 = time.perf_counter()
        rows = prompts(batch, args.prompt_tokens)
        done = greedy_batch(model, tok, rows, args.new_tokens, batch_size=batch)
        wall = time.perf_counter() - t0
        out[f"tok_s_b{batch}"] = sum(len(c.ids) for c in done) / wall
        out.setdefault("greedy", done[0].ids[:32])
    long = torch.tensor(prompts(1, 512))
    with torch.inference_mode():
        t0 = time.perf_counter()
        Decoder(model, 1).prefill(long).argmax(-1)
        out["ttft_512_s"] = time.perf_counter() - t0
    return out


def hf_worker(directory: Path, precision: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    out = {}
    for batch in (1, 16):
        ids = torch.tensor(prompts(batch, args.prompt_tokens))
        with torch.inference_mode():
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)  # fmt: skip
            wall = time.perf_counter() - t0
        new = gen[:, ids.shape[1] :]
        out[f"tok_s_b{batch}"] = new.numel() / wall
        out.setdefault("greedy", new[0, :32].tolist())
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(torch.tensor(prompts(1, 512)), use_cache=True).logits[:, -1].argmax(-1)
        out["ttft_512_s"] = time.perf_counter() - t0
    return out


def llama_worker(directory: Path, precision: str, args) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(directory / f"m-{precision}.gguf"), n_ctx=1024, n_batch=512,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)  # fmt: skip
    prompt = prompts(1, args.prompt_tokens)[0]
    t0, ids = time.perf_counter(), []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        ids.append(token)
        if len(ids) == args.new_tokens:
            break
    out = {"tok_s_b1": len(ids) / (time.perf_counter() - t0), "greedy": ids[:32]}
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompts(1, 512)[0])
    out["ttft_512_s"] = time.perf_counter() - t0
    return out


def worker(name: str, directory: Path, args) -> dict:
    torch.set_num_threads(args.threads)
    peer, precision = name.split("-", 1)
    run = {"ours": ours_worker, "hf": hf_worker, "llama": llama_worker}[peer]
    out = run(directory, precision, args)
    return {"config": name, **out, "peak_rss_gib": peak_rss_kib() / 2**20}


def peak_rss_kib() -> int:
    """This process's peak resident memory: VmHWM, which execve resets (ru_maxrss keeps the parent's
    high-water mark from before the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------------------------- main
def table(results: list[dict], n_params: int, bandwidth: float) -> None:
    by = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    reference = by.get("ours-fp32", [{}])[0].get("greedy")
    med = lambda rows, k: statistics.median(r[k] for r in rows) if k in rows[0] else None
    print(f"read bandwidth {bandwidth:.1f} GB/s; {n_params / 1e6:.1f}M parameters\n")
    print("| config | b=1 tok/s | roofline b=1 | fraction | b=16 tok/s | TTFT 512 | peak RSS | "
          "greedy = ours fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in by.items():
        precision = name.split("-", 1)[1].removesuffix("+compile")
        bound = bandwidth * 1e9 / (n_params * BYTES_PER_WEIGHT[precision])
        b1, b16 = med(rows, "tok_s_b1"), med(rows, "tok_s_b16")
        same = sum(a == b for a, b in zip(rows[0]["greedy"], reference or [], strict=False))
        print(f"| {name} | {b1:.1f} | {bound:.0f} | {b1 / bound:.0%} | {f'{b16:.0f}' if b16 else '-'} | "
              f"{med(rows, 'ttft_512_s') * 1e3:.0f} ms | {med(rows, 'peak_rss_gib'):.2f} GiB | {same}/32 |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--only", help=f"comma-separated configurations (default: {', '.join(CONFIGS)})")
    p.add_argument("--json", help="append every measurement to this JSONL file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.dir), args)))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp), args.model)
        export_ggufs(Path(tmp))
        passthrough = ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                       "--new-tokens", str(args.new_tokens), "--dir", tmp]  # fmt: skip
        for round_ in range(args.rounds):
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, *passthrough]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_})
                speed = results[-1]["tok_s_b1"]
                print(f"round {round_ + 1}: {name}: {speed:.1f} tok/s at batch 1", file=sys.stderr)
    if args.json:
        with open(args.json, "a") as f:
            extra = {"model": args.model, "bandwidth_gb_s": bandwidth}
            f.write("".join(json.dumps(r | extra) + "\n" for r in results))
    table(results, n_params, bandwidth)


if __name__ == "__main__":
    main()
