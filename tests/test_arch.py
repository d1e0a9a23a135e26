"""The Llama-family architecture options of GPTConfig (mlp=swiglu, n_kv_head, qkv_bias, norm_eps,
Llama 3 rope scaling): our model equals transformers' Llama and Qwen2 given the same weights (laid
out as /work/notes/model_options.md says), the KV cache holds n_kv_head heads and decodes as the
full recompute does, such a model trains with AdamW, Muon and LoRA, and old configs still load."""

import os
import subprocess
import sys

import pytest
import torch
from helpers_hf import REPO_ROOT

from gpt.errors import CheckpointError, ConfigError
from gpt.infer.engine import Decoder, KVCache
from gpt.lora import apply_lora, merge_lora
from gpt.model import GPT, GPTConfig
from gpt.ops import rope_frequencies
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.train.optim import configure_optimizer

LLAMA = dict(mlp="swiglu", n_kv_head=2, qkv_bias=True, bias=False, norm="rmsnorm", pos_emb="rope")


def small(**kw) -> GPT:
    torch.manual_seed(0)
    opts = dict(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64, **LLAMA)
    return GPT(GPTConfig(**{**opts, **kw})).eval()


def our_weights(hf_state: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """HF Llama/Qwen2 keys -> ours: q, k, v rows stacked into c_attn, gate then up into c_fc."""
    sd = {"transformer.wte.weight": hf_state["model.embed_tokens.weight"],
          "transformer.ln_f.weight": hf_state["model.norm.weight"]}  # fmt: skip
    sd["lm_head.weight"] = hf_state["model.embed_tokens.weight" if tied else "lm_head.weight"]
    for i in range(n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = [hf + f"self_attn.{p}_proj." for p in "qkv"]
        sd[ours + "attn.c_attn.weight"] = torch.cat([hf_state[a + "weight"] for a in attn])
        if attn[0] + "bias" in hf_state:
            sd[ours + "attn.c_attn.bias"] = torch.cat([hf_state[a + "bias"] for a in attn])
        sd[ours + "attn.c_proj.weight"] = hf_state[hf + "self_attn.o_proj.weight"]
        sd[ours + "mlp.c_fc.weight"] = torch.cat(
            [hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]]
        )
        sd[ours + "mlp.c_proj.weight"] = hf_state[hf + "mlp.down_proj.weight"]
        sd[ours + "ln_1.weight"] = hf_state[hf + "input_layernorm.weight"]
        sd[ours + "ln_2.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
    return sd


SCALING = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_equal_transformers_llama_and_qwen2(family):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5)  # fmt: skip
    if family == "llama":  # GQA 4:2, untied, Llama 3 rope scaling that bends frequencies within 32 tokens
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, **SCALING}
        hf_config = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                             rope_parameters=rope)  # fmt: skip
        hf_model = transformers.LlamaForCausalLM(hf_config)
        ours = dict(n_kv_head=2, qkv_bias=False, tie_embeddings=False, rope_theta=500000.0,
                    rope_scaling_factor=4.0, rope_original_max_position=8)  # fmt: skip
    else:  # multi-query, tied, bias on q, k, v only
        hf_config = transformers.Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True)
        hf_model = transformers.Qwen2ForCausalLM(hf_config)
        ours = dict(n_kv_head=1, qkv_bias=True, tie_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    for p in hf_model.parameters():  # HF zero-initialises biases: random ones test their placement
        torch.nn.init.normal_(p, std=0.1 if p.dim() == 1 else 0.05)
    hf_model.eval()
    model = small(mlp_hidden=96, norm_eps=1e-5, **ours)
    model.load_state_dict(our_weights(hf_model.state_dict(), 2, ours["tie_embeddings"]))
    idx = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        want = hf_model(idx).logits
        got = model(idx)
    assert (got - want).abs().max() < 1e-4


def test_rope_frequencies_follow_transformers_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    for original in (8, 8192):  # 8192: Llama 3's own; 8: every frequency scaled or interpolated
        rope = {"rope_type": "llama3", "rope_theta": 5e5, **SCALING}
        rope["original_max_position_embeddings"] = original
        config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=rope)
        want, _ = _compute_llama3_parameters(config)
        got = rope_frequencies(32, 500000.0, 4.0, 1.0, 4.0, original)
        assert torch.allclose(got, want.float(), rtol=1e-6)
    plain = rope_frequencies(32, 500000.0)
    assert got[0] == plain[0] and torch.allclose(got[-1], plain[-1] / 4)  # highest kept, lowest scaled


def test_swiglu_hidden_width_rule_and_parameter_shapes():
    assert GPTConfig(n_embd=576, n_head=9, mlp="swiglu").mlp_width == 1536  # SmolLM2-135M's
    assert GPTConfig(n_embd=4096, n_head=32, mlp="swiglu").mlp_width == 11008  # Llama 2 7B's
    assert GPTConfig(n_embd=64, n_head=4).mlp_width == 256  # standard: mlp_ratio * n_embd
    sd = small(mlp_hidden=96).state_dict()
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (2 * 96, 64)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (64, 96)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert sd["transformer.h.0.attn.c_attn.bias"].shape == (128,)  # qkv_bias although bias=False
    assert "transformer.h.0.attn.c_proj.bias" not in sd and "transformer.h.0.ln_1.bias" not in sd


@pytest.mark.parametrize("kw, key", [(dict(n_kv_head=3), "model.n_kv_head"), (dict(mlp="geglu"), "model.mlp"),
                                     (dict(mlp_hidden=0), "model.mlp_hidden"),
                                     (dict(rope_scaling_factor=8.0, rope_high_freq_factor=1.0),
                                      "model.rope_scaling_factor")])  # fmt: skip
def test_impossible_options_are_rejected_with_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        GPTConfig(n_head=4, n_embd=64, **kw)


def test_norm_eps_reaches_every_norm_and_defaults_to_the_old_ones():
    assert small(norm_eps=1e-3).transformer.ln_f.eps == 1e-3
    assert small().transformer.h[0].ln_1.eps == 1e-6  # RMSNorm's default as before
    assert small(norm="layernorm").transformer.ln_f.eps == 1e-5


def test_gqa_cache_holds_n_kv_head_heads_and_decodes_as_the_full_recompute():
    gqa, mha = small(), small(n_kv_head=None)
    bytes_of = lambda c: sum(t.numel() * t.element_size() for t in (*c.k, *c.v))
    cache = KVCache(gqa.config, 2, torch.device("cpu"), torch.float32)
    full = KVCache(mha.config, 2, torch.device("cpu"), torch.float32)
    assert cache.k[0].shape == (2, 2, 32, 16) and bytes_of(cache) * 2 == bytes_of(full)
    ids = torch.randint(0, 128, (3, 7))
    for model in (gqa, small(n_kv_head=1)):  # grouped-query and multi-query
        cached, recomputed = Decoder(model, 3), Decoder(model, 3, use_cache=False)
        with torch.no_grad():
            a, b = cached.prefill(ids), recomputed.prefill(ids)
            for _ in range(30):  # past block_size: the window slides and the cache is re-filled
                assert torch.allclose(a, b, atol=1e-5)
                nxt = a.argmax(-1)
                a, b = cached.step(nxt), recomputed.step(nxt)
        assert cached.refills > 0


def test_ragged_rows_in_a_gqa_cache_match_each_row_alone():
    model = small()
    prompts = [torch.randint(0, 128, (1, n)) for n in (3, 9)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : p.size(1)] = p
    with torch.no_grad():
        together = Decoder(model, 2).add(padded, [3, 9])
        for i, p in enumerate(prompts):
            assert torch.allclose(together[i], Decoder(model, 1).prefill(p)[0], atol=1e-5)


def test_lora_on_a_swiglu_gqa_model_trains_and_merges_exactly():
    model = small().train()
    wrapped = apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])
    assert len(wrapped) == 2 * 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = train_five_steps(model, opt)
    model.eval()
    with torch.no_grad():
        before = model(idx)
        after = merge_lora(model)(idx)
    assert torch.allclose(before, after, atol=1e-4)


def train_five_steps(model, opt) -> torch.Tensor:
    """Five steps on one random batch; the loss must fall. Returns the batch (B=4, T=32)."""
    idx = torch.randint(0, 128, (4, 32))
    losses = []
    for _ in range(5):
        loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    return idx

def test_muon_takes_the_gqa_and_swiglu_matrices_and_trains():
    model = small().train()
    from gpt.config import OptimConfig

    opt = configure_optimizer(model, OptimConfig(name="muon", lr=1e-2, warmup_steps=0), "cpu")
    muon = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
    blocks = model.transformer.h
    assert {id(blocks[0].attn.c_attn.weight), id(blocks[0].mlp.c_fc.weight)} <= muon
    assert id(blocks[0].attn.c_attn.bias) not in muon and id(model.transformer.wte.weight) not in muon
    train_five_steps(model, opt)


def test_a_config_without_the_new_keys_loads_as_before():
    new = ("mlp", "mlp_hidden", "n_kv_head", "qkv_bias", "norm_eps", "rope_scaling_factor",
           "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position")  # fmt: skip
    before = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    old = {k: v for k, v in before.to_dict().items() if k not in new}  # a checkpoint from before them
    config = GPTConfig.from_dict(old)
    assert (config.mlp, config.kv_heads, config.qkv_bias, config.mlp_width) == ("standard", 4, False, 256)
    torch.manual_seed(0)
    reference = GPT(before).eval()
    model = GPT(config).eval()
    model.load_state_dict(reference.state_dict())  # strict: the same keys and shapes
    idx = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx))


def test_a_llama_shaped_run_trains_with_muon_then_lora_and_refuses_a_kv_head_override(make_cfg):
    model = dict(n_head=4, n_embd=32, **LLAMA, tie_embeddings=False)
    cfg = make_cfg("llama", model=model, optim=dict(name="muon", lr=3e-3, warmup_steps=2),
                   train=dict(max_steps=12, eval_interval=6))  # fmt: skip
    train(cfg)
    val = [r["val_loss"] for r in read_metrics(cfg.out_dir) if "val_loss" in r]
    assert val[-1] < val[0]
    loaded = load(cfg.out_dir)
    assert loaded.config.n_kv_head == 2 and loaded.config.mlp == "swiglu"
    lora = make_cfg("lora", init_from=cfg.out_dir, model=model, train=dict(max_steps=4, eval_interval=0),
                    finetune=dict(method="lora", lora_rank=4, lora_alpha=8.0))  # fmt: skip
    train(lora)
    assert load(lora.out_dir).config.qkv_bias
    bad = make_cfg("bad", init_from=cfg.out_dir, model={**model, "n_kv_head": 1})
    with pytest.raises(CheckpointError, match="model.n_kv_head=1"):
        train(bad)


@pytest.mark.slow
def test_fsdp_two_ranks_train_the_llama_preset_as_one_process(corpus, tmp_path):
    def args(out: str) -> list[str]:
        return [
            "model=llama_tiny", "data=text", f"data.path={corpus}", "data.name=small", "data.tokenizer=char",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1", "device=cpu", "seed=7",
            f"out_dir={tmp_path / out}", "optim.lr=1e-2", "optim.warmup_steps=1", "train.max_steps=3",
            "train.batch_size=8", "train.micro_batch_size=2", "train.eval_interval=1", "train.eval_steps=1",
            "train.dtype=fp32", "train.progress=false", "wandb.mode=disabled",
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    opts = dict(cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    run = lambda *cmd: subprocess.run(cmd, **opts)
    one = run(sys.executable, "train.py", *args("one"))
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    two = run(*torchrun, "train.py", *args("fsdp"), "train.parallel=fsdp")
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    want = {r["step"]: r for r in read_metrics(tmp_path / "one") if "val_loss" in r}
    got = {r["step"]: r for r in read_metrics(tmp_path / "fsdp") if "val_loss" in r}
    assert set(want) == set(got) == {0, 1, 2, 3}
    for step, record in want.items():
        assert got[step]["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert load(tmp_path / "fsdp").config.n_kv_head == 2
