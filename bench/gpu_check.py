"""GPU check: one command on a fresh GPU machine, one table of pass/fail and figures, in under 8
minutes on one H100/H200-class GPU. It needs this repository, torch and numpy only (no Hydra, no
wandb: it drives the library directly).

    bash bench/gpu_check.sh                           # the same, with a time limit and a log file
    python bench/gpu_check.py                         # on the first CUDA GPU
    python bench/gpu_check.py --device cpu --tiny     # the whole flow on a CPU, tiny shapes (a test)

Rows, in order:
- bf16 + torch.compile: a 6x384 char-level model (nanoGPT's Shakespeare shape) trained 100 steps on
  Tiny Shakespeare bytes, compiled with bf16 autocast, against the same 100 steps in fp32 eager
  (TF32 off): the mean loss of the last 10 steps must agree within 0.05.
- SDPA kernel: which attention kernel F.scaled_dot_product_attention runs for the model under bf16
  autocast (read from the profiler); passes when it is the flash kernel.
- DDP (NCCL) and FSDP2 (fully_shard): a world of one process; 10 fp32 steps of the small model
  wrapped each way must give the unwrapped model's losses (rel. 1e-4), and FSDP2's full state dict
  (the checkpoint layout) must equal the unwrapped weights.
- GPT-2 124M training: bf16 autocast + compile, 16 x 1024 tokens per step, fused AdamW; tokens/s
  and MFU against the GPU's dense bf16 peak (datasheet; the measured matmul peak alongside).
- KV-cached decode: the 124M model with bf16 weights, a 256-token prompt, tokens/s for 1 and 16 rows;
  the same with int8 weights (gpt.quant, ``quantize=int8``), and its greedy tokens against bf16's.
  And with the decode step compiled (``compile=true``, gpt.infer.engine.compile_decode).
- Speculative decoding (gpt.infer.speculative), greedy, batch 1, the 124M model in bf16: prompt lookup
  (``draft=ngram``) on a prompt that quotes a passage twice and starts it a third time, and the small
  6x384 model trained above as the draft model (``draft=RUN``), tokens/s against plain decoding; the
  speculative text must be plain decoding's, token for token (checked in fp32, where the one-token
  step and the k-token check round alike; bf16 may break a near-tie either way).
- peak memory: torch.cuda.max_memory_allocated over the 124M training.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.config import OptimConfig
from gpt.device import autocast_for, measure_peak_flops, synchronize
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder, compile_decode
from gpt.infer.generate import generate
from gpt.infer.speculative import ModelDrafter, NgramDrafter
from gpt.model import GPT, GPTConfig
from gpt.quant import quantize_model
from gpt.tokenizer import CharTokenizer
from gpt.train.optim import configure_optimizer
from gpt.typed_config import REPO_ROOT

# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first
# matching substring of torch.cuda.get_device_name wins (other GPUs: the measured matmul peak
# stands in, and the table says so)
DENSE_BF16_TFLOPS = [
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
]  # fmt: skip
SMALL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256, bias=False,
             norm="rmsnorm", pos_emb="rope", dropout=0.0)  # fmt: skip
TINY = dict(SMALL, n_layer=2, n_head=2, n_embd=32, block_size=32)
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def datasheet_peak(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called ``name`` (from DENSE_BF16_TFLOPS), None if unknown."""
    for key, tflops in DENSE_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def byte_batches(block: int, batch: int, device: torch.device, seed: int = 0) -> Callable[[int], tuple]:
    """batch(step) -> (x, y): windows of Tiny Shakespeare's bytes (vocabulary 256), a pure function
    of the step, so two runs see the same data."""
    text = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_bytes()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        ix = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        xy = torch.stack([data[i : i + block + 1] for i in ix.tolist()]).to(device)
        return xy[:, :-1], xy[:, 1:]

    return get


def train_losses(
    shape: dict, device: torch.device, dtype: torch.dtype, steps: int, batch: int,
    compile: bool = False, wrap: Callable[[GPT], torch.nn.Module] | None = None, lr: float = 2e-3,
) -> tuple[list[float], GPT, float]:  # fmt: skip
    """(loss per step, the trained raw model, seconds per step after the first 5) of ``steps`` AdamW
    steps from seed 0; ``wrap`` applies DDP/FSDP2, ``compile`` torch.compile."""
    torch.manual_seed(0)
    raw = GPT(GPTConfig(**shape)).to(device)
    model = wrap(raw) if wrap else raw
    opt = configure_optimizer(raw, OptimConfig(lr=lr, warmup_steps=10), device.type)
    fwd = torch.compile(model) if compile else model
    get, losses, t0 = byte_batches(shape["block_size"], batch, device), [], 0.0
    for step in range(steps):
        if step == min(5, steps - 1):
            synchronize(device)
            t0 = time.perf_counter()
        x, y = get(step)
        with autocast_for(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    synchronize(device)
    return losses, raw, (time.perf_counter() - t0) / max(1, steps - min(5, steps - 1))


def sdpa_kernel_name(shape: dict, device: torch.device, dtype: torch.dtype) -> str:
    """The attention op the profiler sees in a forward of the model (e.g. '..._flash_attention')."""
    from torch.profiler import ProfilerActivity, profile

    model = GPT(GPTConfig(**shape)).to(device).eval()
    x = torch.zeros(2, shape["block_size"], dtype=torch.long, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), autocast_for(device, dtype), profile(activities=activities) as prof:
        model(x)
        synchronize(device)
    names = sorted(
        {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and "_attention" in e.key}
    )
    specific = [n for n in names if n != "aten::scaled_dot_product_attention"]
    return ", ".join(specific or names) or "none"


def decode_tokens_per_s(model: GPT, rows: int, prompt_len: int, steps: int) -> float:
    """Greedy decode speed with the KV cache: rows x steps tokens after one prefill."""
    device = model.lm_head.weight.device
    prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    decoder = Decoder(model, rows)
    with torch.inference_mode():
        nxt = decoder.prefill(prompt).argmax(-1)
        decoder.step(nxt)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = decoder.step(nxt).argmax(-1)
        nxt.tolist()
        synchronize(device)
    return rows * steps / (time.perf_counter() - t0)


def int8_rows(model: GPT, prompt_len: int, steps: int) -> list[tuple[str, str, str]]:
    """KV decode of ``model`` (bf16) with int8 weights (quantize=int8), 1 and 16 rows, against bf16;
    plus how many of 1 row's greedy tokens match bf16's (int8 is close, not identical)."""
    try:
        int8 = quantize_model(clone(model, torch.float32), "int8").to(torch.bfloat16).eval()
        rows = []
        for n in (1, 16):
            tps = decode_tokens_per_s(int8, n, prompt_len, steps)
            rows.append((f"int8 KV decode, {n} row{'s' if n > 1 else ''}", f"{tps:,.0f} tok/s",
                         f"quantize=int8, bf16 activations, {prompt_len}-token prompt"))  # fmt: skip
        prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        ids = prompt[0].tolist()
        settings = GenerationConfig(max_new_tokens=steps, temperature=0.0)
        a, b = (generate(m, byte_tokenizer(), ids, settings)[0] for m in (model, int8))
        same = sum(x == y for x, y in zip(a, b, strict=False))
        rows.append(
            ("int8 greedy tokens = bf16's", f"{same}/{len(a)}", "1 row; close, not identical by design")
        )
        return rows
    except Exception as e:  # e.g. no int8 kernel on this device: say so, the other rows go on
        return [("int8 KV decode", "FAIL", failure(e))]


def compiled_rows(model: GPT, prompt_len: int, steps: int, tiny: bool) -> list[tuple[str, str, str]]:
    """KV decode with the step compiled (compile=true: engine.compile_decode) on a copy, 1 and 16 rows."""
    if tiny:  # the CPU test of this flow: two compiles would double its time
        return [("compiled KV decode", "not run", "--tiny")]
    try:
        compiled, rows = clone(model, torch.bfloat16), []
        compile_decode(compiled)
        for n in (1, 16):  # decode_tokens_per_s's warm-up step compiles
            tps = decode_tokens_per_s(compiled, n, prompt_len, steps)
            rows.append((f"compiled KV decode, {n} row{'s' if n > 1 else ''}", f"{tps:,.0f} tok/s",
                         "compile=true (torch.compile of the decode step, no CUDA graphs)"))  # fmt: skip
        return rows
    except Exception as e:  # e.g. no compiler toolchain: say so, the other rows go on
        return [("compiled KV decode", "FAIL", failure(e))]


def clone(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of ``model`` in ``dtype`` on its device, through its state dict (a model that has
    decoded on the CPU holds oneDNN-packed weights, which deepcopy cannot copy)."""
    copied = GPT(model.config).to(model.lm_head.weight.device)
    copied.load_state_dict(model.state_dict())
    return copied.to(dtype).eval()


def failure(e: Exception) -> str:
    """An exception as a table cell: its type and message, one line, no column bars."""
    return f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]


def byte_tokenizer() -> CharTokenizer:
    """Characters 0-255 as ids 0-255: the byte models' vocabulary (text read as latin-1)."""
    return CharTokenizer([chr(i) for i in range(256)])


def speculative_rows(target: GPT, draft: GPT, tokens: int) -> list[tuple[str, str, str]]:
    """Greedy tokens/s of plain decoding against draft=ngram (a quoting prompt) and a draft model
    (Shakespeare), batch 1, bf16; the speculative texts of fp32 copies must be plain decoding's."""
    tok = byte_tokenizer()
    text = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_bytes().decode("latin-1")
    passage = text[2000:2150]
    cases = [("draft=ngram, quoting the prompt", tok.encode(f"{passage}\n\n{passage}\n\n{passage[:40]}"),
              lambda d: NgramDrafter(4, 3)),
             ("draft model (6x384)", tok.encode(text[:64]), lambda d: ModelDrafter(d, 4, 256))]  # fmt: skip
    settings = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    target32, draft32 = clone(target, torch.float32), clone(draft, torch.float32)
    rows = []
    for name, ids, make in cases:
        try:
            rate = {}
            for label, drafter in [("plain", None), ("spec", make(draft))] * 2:  # the first round warms up
                synchronize(target.lm_head.weight.device)
                t0 = time.perf_counter()
                out = generate(target, tok, ids, settings, drafter=drafter)[0]
                rate[label] = len(out) / (time.perf_counter() - t0)
            same = generate(target32, tok, ids, settings, drafter=make(draft32)) == generate(
                target32, tok, ids, settings
            )
            rows.append((f"speculative decode, {name}", "pass" if same else "FAIL",
                         f"{rate['spec']:,.0f} vs plain {rate['plain']:,.0f} tok/s "
                         f"({rate['spec'] / rate['plain']:.2f}x), 1 row, bf16, k=4; fp32 greedy text "
                         f"= plain decoding's: {same}"))  # fmt: skip
        except Exception as e:  # one clear row; the others go on
            rows.append((f"speculative decode, {name}", "FAIL", failure(e)))
    return rows


def init_one_process_group(device: torch.device) -> str:
    """A process group of one (NCCL on CUDA, gloo on the CPU) on a free local port."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    return backend


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (check, result, detail) rows, ready for docs/benchmarks.md."""
    lines = ["| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def run_checks(
    device: torch.device, tiny: bool, log: Callable[[str], None] = print
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    cuda = device.type == "cuda"
    small = TINY if tiny else SMALL
    steps, batch = (12, 4) if tiny else (100, 32)
    half = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are true fp32
    torch.backends.cudnn.allow_tf32 = False

    log("bf16 + compile vs fp32 ...")
    ref, _, _ = train_losses(small, device, torch.float32, steps, batch)
    got, small_model, dt = train_losses(small, device, half, steps, batch, compile=cuda)
    a, b = sum(ref[-10:]) / len(ref[-10:]), sum(got[-10:]) / len(got[-10:])
    ok = abs(a - b) < 0.05 and (tiny or b < ref[0] - 0.5)  # tiny: too few steps to learn much
    what = "bf16 + compile" if cuda else "bf16 (no compile on CPU)"
    rows.append(
        (
            f"{what}, {steps} steps",
            "pass" if ok else "FAIL",
            f"last-10 loss {b:.4f} vs fp32 {a:.4f} (start {ref[0]:.2f}); {dt * 1e3:.1f} ms/step",
        )
    )

    log("SDPA kernel ...")
    kernel = sdpa_kernel_name(small, device, half)
    rows.append(("SDPA kernel (bf16)", "pass" if "flash" in kernel else "FAIL", kernel))

    log("DDP and FSDP2, one process ...")
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = init_one_process_group(device)
    try:
        n = 10 if not tiny else 4
        plain, plain_model, _ = train_losses(small, device, torch.float32, n, batch)
        ddp, _, _ = train_losses(
            small,
            device,
            torch.float32,
            n,
            batch,
            wrap=lambda m: DDP(m, device_ids=[device.index] if cuda else None),
        )

        def shard(m: GPT) -> GPT:
            for block in m.transformer.h:
                fully_shard(block)
            return fully_shard(m)

        fsdp, fsdp_model, _ = train_losses(small, device, torch.float32, n, batch, wrap=shard)
        full = get_model_state_dict(
            fsdp_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        same_weights = all(
            k in full and torch.allclose(full[k].float(), v.detach().cpu().float(), rtol=1e-4, atol=1e-5)
            for k, v in plain_model.state_dict().items()
        )
        for name, losses, extra in (
            ("DDP", ddp, ""),
            ("FSDP2", fsdp, f"; full state dict = weights: {same_weights}"),
        ):
            worst = max(abs(x - y) / abs(y) for x, y in zip(losses, plain, strict=True))
            ok = worst < 1e-4 and (name == "DDP" or same_weights)
            rows.append((f"{name} ({backend}, 1 process)", "pass" if ok else "FAIL",
                         f"{n} fp32 steps, max rel. loss diff vs unwrapped {worst:.1e}{extra}"))  # fmt: skip
    finally:
        dist.destroy_process_group()

    log("GPT-2 124M training ...")
    big = dict(GPT2, n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=256) if tiny else GPT2
    label = "tiny GPT" if tiny else "GPT-2 124M"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tsteps, tbatch = (6, 2) if tiny else (25, 16)
    losses, model, dt = train_losses(big, device, half, tsteps, tbatch, compile=cuda, lr=6e-4)
    tokens_s = tbatch * big["block_size"] / dt
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    measured = measure_peak_flops(device, half)
    peak = datasheet_peak(name) or measured
    mfu = model.flops_per_token() * tokens_s / peak
    target = "" if tiny or not cuda else (" (target >= 40%: " + ("met" if mfu >= 0.40 else "NOT met") + ")")
    rows.append(
        (
            f"{label} train, bf16{' + compile' if cuda else ''}, {tbatch} x {big['block_size']}",
            f"{tokens_s:,.0f} tok/s",
            f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s "
            f"({'datasheet' if datasheet_peak(name) else 'measured'}; measured matmul peak "
            f"{measured / 1e12:.0f}){target}; {dt * 1e3:.0f} ms/step; loss {losses[-1]:.3f}",
        )
    )
    if cuda:
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(
            (f"peak memory ({label} training)", f"{peak_mem:.2f} GiB", "torch.cuda.max_memory_allocated")
        )

    log("KV-cached decode ...")
    model = model.to(half).eval()
    prompt_len = min(256, big["block_size"] // 2)
    dsteps = 8 if tiny else 200
    for rows_n in (1, 16):
        tps = decode_tokens_per_s(model, rows_n, prompt_len, min(dsteps, big["block_size"] - prompt_len - 2))
        rows.append((f"KV decode, {rows_n} row{'s' if rows_n > 1 else ''}", f"{tps:,.0f} tok/s",
                     f"bf16 weights, {prompt_len}-token prompt, greedy"))  # fmt: skip
    log("int8 and speculative decode ...")
    rows += int8_rows(model, prompt_len, min(dsteps, big["block_size"] - prompt_len - 2))
    rows += speculative_rows(model, small_model.to(half).eval(), 8 if tiny else 200)
    rows += compiled_rows(model, prompt_len, min(dsteps, big["block_size"] - prompt_len - 2), tiny)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (checks the flow only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; run on a GPU machine (or --device cpu --tiny)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.time()
    rows = run_checks(device, args.tiny, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"\ngpu check: {hw}, torch {torch.__version__}, {time.time() - t0:.0f} s, cpus {os.cpu_count()}")
    print(format_table(rows))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
