"""Speed features that must not change results: the dtype policy (bf16 on CPUs that have it tracks
fp32), Muon (parameter split, its own LR on the schedule, exact resume), the last-position-only
prefill, and the CPU-safe parts of the GPU check."""

import sys

import pytest
import torch

from gpt import device as device_mod
from gpt.checkpoint import load_checkpoint
from gpt.config import OptimConfig
from gpt.device import resolve_dtype
from gpt.errors import CheckpointError, ConfigError
from gpt.infer.engine import Decoder
from gpt.model import GPT, GPTConfig
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.train.optim import Optimizers, configure_optimizer, lr_at

CPU = torch.device("cpu")


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    shape = dict(
        block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True, tie_embeddings=False
    )
    return GPT(GPTConfig(**{**shape, **kw}))


# --------------------------------------------------------------------------------------- dtype policy


def test_auto_dtype_follows_the_cpu_bf16_capability(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_bf16_native", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(device_mod, "cpu_bf16_native", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("fp32", CPU) == torch.float32 and resolve_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ConfigError, match="train.dtype=fp16"):
        resolve_dtype("fp16", CPU, key="train.dtype")


def test_cpu_capability_probe_agrees_with_the_cpu_flags():
    flags = set()
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert device_mod.cpu_bf16_native() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_keep_freed_memory_is_accepted_by_glibc():
    """glibc's mallopt returns 0 for a parameter or value it refuses (an mmap threshold above
    32 MiB, say): both settings training applies on the CPU must be taken. Their effect (page faults
    a step, ms/step) is measured in docs/benchmarks.md, not timed here."""
    import ctypes

    try:
        has_mallopt = hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        has_mallopt = False
    if not has_mallopt:
        pytest.skip("not glibc")
    assert device_mod.keep_freed_memory() is True
    assert device_mod.keep_freed_memory() is True  # and again: training may start twice in a process


def test_bf16_training_tracks_fp32(make_cfg, one_thread):
    runs = {}
    for name in ("fp32", "bf16"):
        cfg = make_cfg(name, train=dict(dtype=name, max_steps=40, eval_interval=20))
        train(cfg)
        runs[name] = read_metrics(cfg.out_dir)
    first, last = runs["fp32"][0]["val_loss"], runs["fp32"][-1]["val_loss"]
    assert last < first - 0.5  # it learned something for the comparison to mean anything
    # 0.05 of a loss near 3.4: bf16 matmuls round differently per CPU (AMX on Intel, AVX512-BF16 on AMD
    # gave train_loss 3.427 against fp32's 3.393 at step 20), but a broken bf16 path is off by far more
    for a, b in zip(runs["fp32"], runs["bf16"], strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=0.05), (a, b)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=0.05), (a, b)


# ----------------------------------------------------------------------------------------------- Muon


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_model()
    opt = configure_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names == {
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
    }
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= adamw_names
    assert not muon_names & adamw_names and len(muon_names | adamw_names) == len(names)
    # each part on the one schedule at its own peak LR
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    assert all(g["lr_scale"] == 1.0 for g in adamw.param_groups)
    with pytest.raises(ConfigError, match="optim.muon_lr"):  # checked by the config, before any model
        OptimConfig(name="muon", muon_lr=0.0)


def test_muon_steps_lower_the_loss_and_adamw_is_unchanged_by_default():
    model = small_model()
    assert isinstance(configure_optimizer(model, OptimConfig(), "cpu"), torch.optim.AdamW)
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=0, schedule="constant")
    opt = configure_optimizer(model, cfg, "cpu")
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(15):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, 15) * g["lr_scale"]
        loss = model(x, x)  # learn to copy: easy, so a working optimizer drops the loss fast
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert opt.state and all("momentum_buffer" in opt.optimizers[0].state[p] for p in opt.optimizers[0].state)


def test_muon_run_resumes_exactly(make_cfg):
    sections = dict(optim=dict(name="muon", muon_lr=0.02), model=dict(dropout=0.1))
    full = make_cfg("full", **sections, train=dict(max_steps=20, eval_interval=10))
    train(full)
    part = make_cfg("part", **sections, train=dict(max_steps=20, eval_interval=10))
    train(part, should_stop=lambda step: step == 7)
    state = load_checkpoint(part.out_dir)
    assert state["step"] == 7
    # one name-keyed state for both optimizers: Muon's momentum and AdamW's moments
    assert "momentum_buffer" in state["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]
    assert "exp_avg" in state["optimizer"]["state"]["transformer.wte.weight"]
    train(make_cfg("part", **sections, train=dict(max_steps=20, eval_interval=10), resume=True))
    a, b = read_metrics(full.out_dir), read_metrics(part.out_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 10, 20]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"], (ra, rb)
    assert a[-1]["val_loss"] < a[0]["val_loss"] - 0.5
    with pytest.raises(
        ConfigError, match="optim.name='adamw' \\(checkpoint: 'muon'\\)"
    ):  # not silently mixed
        train(make_cfg("part", model=dict(dropout=0.1), train=dict(max_steps=25), resume=True))
    forced = make_cfg(
        "part", model=dict(dropout=0.1), train=dict(max_steps=25), resume=True, resume_force=True
    )
    with pytest.raises(CheckpointError, match="optim=adamw or optim=muon"):  # even when forced
        train(forced)


# -------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_last_only_logits_equal_the_last_row_of_all_logits(pos_emb):
    model = small_model(pos_emb=pos_emb).eval()
    idx = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, last = model(idx), model(idx, last_only=True)
    assert last.shape == (3, 1, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    # targets: the loss over every position, whatever last_only says
    assert model(idx, idx, last_only=True).shape == ()


def test_prefill_returns_the_logits_of_the_whole_prompt_forward():
    model = small_model().eval()
    prompt = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(prompt)[:, -1]
        decoder = Decoder(model, batch_size=2)
        got = decoder.prefill(prompt)
        nxt = decoder.step(torch.tensor([5, 6]))
        ref = model(torch.cat([prompt.expand(2, -1), torch.tensor([[5], [6]])], dim=1))[:, -1]
    torch.testing.assert_close(got, want.expand(2, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- the GPU check


def load_gpu_check():
    return load_bench("gpu_check")


def test_gpu_check_peaks_and_table():
    gc = load_gpu_check()
    assert gc.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert gc.datasheet_peak("NVIDIA H200") == 989e12 and gc.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gc.datasheet_peak("Some Future GPU") is None
    table = gc.format_table([("a", "pass", "x"), ("b", "FAIL", "y")]).splitlines()
    assert table[0] == "| check | result | detail |" and table[-1] == "| b | FAIL | y |"


def test_gpu_check_flow_runs_on_the_cpu_with_tiny_shapes(one_thread):
    gc = load_gpu_check()
    rows = gc.run_checks(CPU, tiny=True, log=lambda s: None)
    results = {name.split(" (")[0].split(",")[0]: (result, detail) for name, result, detail in rows}
    assert results["bf16"][0] == "pass", results["bf16"]
    assert results["SDPA kernel"][0] == "pass" and "flash" in results["SDPA kernel"][1]
    assert results["DDP"][0] == "pass" and results["FSDP2"][0] == "pass", results
    assert "tok/s" in results["tiny GPT train"][0] and "MFU" in results["tiny GPT train"][1]
    assert {"KV decode"} <= set(results) and sum(name.startswith("KV decode") for name, _, _ in rows) == 2
    assert sum(name.startswith("int8 KV decode") for name, _, _ in rows) == 2, results  # issue 25's rows
    assert results["speculative decode"][0] == "pass" and sum("speculative" in r[0] for r in rows) == 2, rows
    assert not torch.distributed.is_initialized()  # the one-process group is gone again


# ------------------------------------------------------------------------- the nanoGPT side-by-side


def load_bench(name: str):
    import importlib.util

    from gpt.typed_config import REPO_ROOT

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vs_nanogpt_reads_both_logs_and_builds_a_valid_command(tmp_path):
    from gpt.commands.cli import compose_config
    from gpt.commands.train import TRAIN
    from gpt.config import TrainRunConfig

    vs = load_bench("vs_nanogpt")
    nano_log = (
        "step 0: train loss 4.2, val loss 4.2\niter 0: loss 4.2, time 900.0ms, mfu -100.00%\n"
        + "".join(f"iter {i}: loss 3.{i}, time {30 + i}.5ms, mfu 1.00%\n" for i in range(1, 8))
    )
    assert vs.step_times(nano_log, vs.NANO_LINE, skip=5) == [36.5, 37.5]
    ours_log = "".join(
        f"step {i:>6}/8 | loss 3.0 | lr 1.00e-03 | 1,000 tok/s | mfu 1.0% | {20 + i}.0 ms/step\n"
        for i in range(1, 9)
    )
    assert vs.step_times(ours_log, vs.OURS_LINE, skip=6) == [27.0, 28.0]
    s = vs.summary("cpu", vs.SHAPES["cpu"], [40.0, 30.0, 50.0], [20.0, 25.0], [1.5, 1.1, 1.3])
    assert s["tokens_per_step"] == 768 and s["speedup"] == round(40.0 / 22.5, 2) and s["ours_tok_s"] == 34133
    assert s["per_round"] == "1.30x (1.10-1.50)"
    # every override of our command is a real key, giving nanoGPT's shape
    cmd = vs.ours_command(vs.SHAPES["6x384"], 10, tmp_path / "o", "auto")
    cfg = TrainRunConfig.from_dict(compose_config(TRAIN, cmd[2:])[0])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.train.batch_size) == (
        6,
        384,
        256,
        8,
    )
    assert cfg.train.eval_interval == 0 and cfg.train.dtype == "auto"
    nano = vs.nanogpt_command(tmp_path, vs.SHAPES["cpu"], 10, tmp_path / "n")
    assert "--compile=False" in nano and "--block_size=64" in nano and "--batch_size=12" in nano
    compiled = vs.nanogpt_command(tmp_path, vs.SHAPES["cpu"], 10, tmp_path / "n", compile=True)
    assert "--compile=True" in compiled
    with pytest.raises(SystemExit, match="not a nanoGPT checkout"):
        vs.main([str(tmp_path)])


def test_vs_nanogpt_bare_times_both_models_in_turns(tmp_path):
    """--bare loads nanoGPT's model.py from the checkout: here a stand-in with its interface."""
    vs = load_bench("vs_nanogpt")
    (tmp_path / "model.py").write_text(
        "from dataclasses import dataclass\nimport torch\n\n"
        "@dataclass\nclass GPTConfig:\n    n_layer: int; n_head: int; n_embd: int; block_size: int\n"
        "    vocab_size: int; dropout: float; bias: bool\n\n"
        "class GPT(torch.nn.Module):\n"
        "    def __init__(self, c):\n        super().__init__(); print('number of parameters')\n"
        "        self.emb = torch.nn.Embedding(c.vocab_size, c.vocab_size)\n"
        "    def forward(self, x, y):\n        logits = self.emb(x)\n"
        "        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())\n"
        "    def configure_optimizers(self, wd, lr, betas, device):\n"
        "        return torch.optim.AdamW(self.parameters(), lr=lr)\n"
    )
    shape = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2)
    nano, ours = vs.bare_steps(tmp_path, shape, rounds=2, iters=2, dtype="fp32")
    assert len(nano) == len(ours) == 2 and all(t > 0 for t in nano + ours)
    assert "nanogpt_model" not in sys.modules and str(tmp_path) not in sys.path


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_on_two_ranks_matches_one_process(tmp_path, corpus, parallel):
    """Muon under DDP and FSDP2 (2 gloo ranks) gives the one-process losses; FSDP2's Newton-Schulz
    runs on the sharded matrices as DTensors (global math, bf16 rounding in another order)."""
    import json
    import os
    import subprocess
    import sys

    from gpt.typed_config import REPO_ROOT

    def args(out: str) -> list[str]:
        return [
            "model=tiny", "data=text", f"data.path={corpus}", "data.name=small", "data.tokenizer=char",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1", "device=cpu", "seed=7",
            "optim=muon", "optim.warmup_steps=1", "optim.grad_clip=0.05", "train.max_steps=4",
            "train.batch_size=8", "train.eval_interval=1", "train.eval_steps=1", "train.ckpt_interval=0",
            "train.progress=false", "train.peak_flops=1e12", "train.dtype=fp32", "wandb.mode=disabled",
            f"train.parallel={parallel}", f"out_dir={tmp_path / out}",
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    train_py = str(REPO_ROOT / "train.py")
    one = subprocess.run([sys.executable, train_py, *args("one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train_py,
         *args("two")], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4), (ra, rb)
    assert a[-1]["val_loss"] < a[0]["val_loss"] - 0.1
