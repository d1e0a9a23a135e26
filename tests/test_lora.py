"""LoRA (gpt.lora): adapters start as the base model, only they train and only they are saved,
merging gives the unmerged outputs, LoRA runs resume exactly, a changed base model is refused, and
the adapter file of the gpt2 shape is a small fraction of a full checkpoint."""

import os
import shutil

import pytest
import torch

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.commands.export import merge_main
from gpt.errors import CheckpointError, ConfigError
from gpt.infer.generate import GenerationConfig, generate
from gpt.lora import LoRALinear, adapter_weights, apply_lora, merge_lora
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.stage_config import FinetuneConfig
from gpt.train.loop import train

LORA = dict(method="lora", lora_rank=4, lora_alpha=8.0)


def tiny(**options) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **options)
    return GPT(config).eval()


def test_adapters_start_as_the_base_model_and_are_all_that_trains():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(idx)
    base_keys = set(model.state_dict())
    wrapped = apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])
    assert len(wrapped) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    keys = set(model.state_dict())
    assert base_keys <= keys and keys - base_keys == set(adapter_weights(model.state_dict()))
    with torch.no_grad():
        assert torch.equal(model(idx), before)  # B = 0: exactly the base model at the start
    model.train()
    model(idx, idx).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())

    only_attn = tiny()
    assert len(apply_lora(only_attn, 2, 4.0, 0.0, ["attn.c_proj"])) == 2
    with pytest.raises(ConfigError, match=r"matches no linear layer for \['lm_head'\]; valid: \["):
        apply_lora(tiny(), 2, 4.0, 0.0, ["c_attn", "lm_head"])


@pytest.mark.parametrize("options", [
    {}, {"bias": False, "norm": "rmsnorm", "pos_emb": "rope"},
    {"bias": False, "norm": "rmsnorm", "pos_emb": "rope", "mlp": "swiglu", "n_kv_head": 1, "qkv_bias": True},
])  # fmt: skip
def test_merged_equals_unmerged(options):
    model = tiny(**options)
    base_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8.0, dropout=0.1, targets=["c_attn", "c_proj", "c_fc"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)  # a trained adapter
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        unmerged = model(idx)
        merged = merge_lora(model)(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_finetune_config_validation():
    bad = {"lora_rank": 0, "lora_alpha": 0.0, "lora_dropout": 1.0, "lora_targets": []}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"finetune.{key}"):
            FinetuneConfig(**{key: value})


@pytest.fixture
def base_run(make_cfg):
    cfg = make_cfg("base", train=dict(max_steps=20, eval_interval=0))
    train(cfg)
    return cfg


def lora_cfg(make_cfg, base_run, out="lora", **sections):
    sections["train"] = {"max_steps": 8, "eval_interval": 4, **sections.get("train", {})}
    return make_cfg(
        out, init_from=base_run.out_dir, finetune=LORA, optim=dict(lr=1e-2, warmup_steps=2), **sections
    )


def greedy(model, tokenizer, n=24) -> list[int]:
    settings = GenerationConfig(max_new_tokens=n, temperature=0.0, seed=0)
    return generate(model, tokenizer, tokenizer.encode("ROMEO:\n"), settings)[0]


def test_lora_run_trains_and_saves_only_adapters_and_samples_merged_or_not(
    make_cfg, base_run, tmp_path, capsys
):
    cfg = lora_cfg(make_cfg, base_run)
    train(cfg)
    records = read_metrics(cfg.out_dir)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    state = load_checkpoint(cfg.out_dir)
    assert state["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in state["model"])
    assert state["lora"]["rank"] == 4 and state["lora"]["base"] == base_run.out_dir
    # the base part of the fine-tuned model is the base checkpoint, untouched
    base = load_checkpoint(base_run.out_dir)["model"]
    loaded = load(cfg.out_dir)
    model, tokenizer = loaded.build(), loaded.tokenizer
    tuned = model.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in base.items())
    assert any(v.abs().sum() > 0 for k, v in tuned.items() if k.endswith("lora_B"))
    # sampling: unmerged adapters, merged on load, and the merged checkpoint all agree
    merged = load(cfg.out_dir, merge=True).build()
    merge_main([f"ckpt={cfg.out_dir}", f"out={tmp_path / 'merged'}"])
    assert "merged the LoRA adapters" in capsys.readouterr().out
    plain_loaded = load(tmp_path / "merged")
    plain, plain_state = plain_loaded.build(), plain_loaded.state
    assert "lora" not in plain_state and set(plain_state["model"]) == set(base)
    out = greedy(model, tokenizer)
    assert out == greedy(merged, tokenizer) == greedy(plain, tokenizer)
    with pytest.raises(SystemExit):  # an existing merged checkpoint is never replaced silently
        merge_main([f"ckpt={cfg.out_dir}", f"out={tmp_path / 'merged'}"])
    assert "overwrite=true" in capsys.readouterr().err


def test_lora_run_resumes_exactly(make_cfg, base_run):
    full = lora_cfg(make_cfg, base_run, "full", model=dict(dropout=0.1))
    train(full)
    part = lora_cfg(make_cfg, base_run, "part", model=dict(dropout=0.1))
    assert train(part, should_stop=lambda step: step == 5)["stopped"] == "requested"
    resumed = lora_cfg(make_cfg, base_run, "part", model=dict(dropout=0.1))
    resumed.init_from, resumed.resume = None, True
    train(resumed)
    a, b = read_metrics(full.out_dir), read_metrics(part.out_dir)
    assert [(r["step"], r["val_loss"]) for r in a] == [(r["step"], r["val_loss"]) for r in b]
    with pytest.raises(ConfigError, match="finetune.lora_rank=2 \\(checkpoint: 4\\)"):
        resumed.finetune.lora_rank = 2
        train(resumed)


def test_lora_needs_a_base_and_refuses_a_changed_or_missing_one(make_cfg, base_run, tmp_path):
    with pytest.raises(ConfigError, match="set init_from"):
        train(make_cfg("nobase", finetune=LORA))
    cfg = lora_cfg(make_cfg, base_run, train=dict(max_steps=2, eval_interval=0))
    train(cfg)
    shutil.move(base_run.out_dir, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="not found"):
        load(cfg.out_dir)
    shutil.move(tmp_path / "moved", base_run.out_dir)
    train(make_cfg("base", seed=8, overwrite=True, train=dict(max_steps=2, eval_interval=0)))
    with pytest.raises(CheckpointError, match="changed since the LoRA adapters"):
        load(cfg.out_dir)


def test_adapter_file_is_under_5_percent_of_the_gpt2_checkpoint(tmp_path):
    """The gpt2 (124M) shape with the default LoRA settings (rank 8 on c_attn, c_proj, c_fc)."""
    with torch.device("meta"):  # conf/model/gpt2.yaml; weights allocated, not initialised: sizes only
        model = GPT(GPTConfig(block_size=1024, vocab_size=50304))
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties: tie again, as GPT does
    full = save_checkpoint(tmp_path / "full.pt", {"model": model.state_dict()})
    defaults = FinetuneConfig()
    apply_lora(model, defaults.lora_rank, defaults.lora_alpha, defaults.lora_dropout, defaults.lora_targets)
    adapter = save_checkpoint(tmp_path / "adapter.pt", {"model": adapter_weights(model.state_dict())})
    ratio = os.path.getsize(adapter) / os.path.getsize(full)
    print(f"adapter {os.path.getsize(adapter) / 1e6:.2f} MB / full {os.path.getsize(full) / 1e6:.1f} MB")
    assert ratio < 0.05, ratio
