"""Model: causality, initial loss, options, ignored targets, parameter/FLOP accounting."""

import math

import pytest
import torch

from gpt.errors import ConfigError
from gpt.model import GPT, GPTConfig

OPTIONS = [
    dict(norm="layernorm", pos_emb="learned", bias=True, tie_embeddings=True),
    dict(norm="rmsnorm", pos_emb="rope", bias=False, tie_embeddings=False),
    dict(norm="rmsnorm", pos_emb="rope", bias=False, activation="gelu"),
    dict(norm="layernorm", pos_emb="learned", bias=True, activation="relu2"),
    dict(norm="rmsnorm", pos_emb="rope", bias=False, mlp="swiglu", n_kv_head=1, qkv_bias=True),  # Llama-like
]


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("opts", OPTIONS)
def test_causality_changing_token_t_leaves_earlier_logits_unchanged(opts):
    model = small(**opts)
    idx = torch.randint(0, 64, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)  # the change is seen from t on


@pytest.mark.parametrize("opts", OPTIONS)
def test_initial_loss_is_close_to_log_vocab(opts):
    model = small(vocab_size=512, **opts)
    idx = torch.randint(0, 512, (8, 16))
    with torch.no_grad():
        loss = model(idx, torch.randint(0, 512, (8, 16))).item()
    assert abs(loss - math.log(512)) < 0.3


def test_targets_minus_one_are_ignored():
    model = small()
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    masked = tgt.clone()
    masked[:, :8] = -1
    with torch.no_grad():
        logits = model(idx)
        expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 64), tgt[:, 8:].reshape(-1))
        assert torch.allclose(model(idx, masked), expected, atol=1e-5)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = small(tie_embeddings=True), small(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_residual_projections_get_depth_scaled_init():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=8, n_head=4, n_embd=256))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001


def test_flops_per_token_follows_6n_plus_attention():
    model = small()
    n = model.num_params()
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(n_embd=30, n_head=4), "n_head"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(pos_emb="alibi"), "model.pos_emb"),
        (dict(n_layer=0), "model.n_layer"),
        (dict(activation="swiglu"), "model.activation"),
    ],
)
def test_impossible_shapes_are_rejected_with_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        small(**kw)


def test_sequence_longer_than_block_size_raises():
    with pytest.raises(ValueError, match="block_size"):
        small()(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_only_in_training_mode():
    model = small(dropout=0.5)
    idx = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("activation, reference", [
    ("gelu_tanh", lambda h: torch.nn.functional.gelu(h, approximate="tanh")),
    ("gelu", torch.nn.functional.gelu),
    ("relu2", lambda h: torch.relu(h) ** 2),
])  # fmt: skip
def test_mlp_activation_is_the_one_configured(activation, reference):
    mlp = small(activation=activation).transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = mlp.c_proj(reference(mlp.c_fc(x)))
        assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_cpu_bf16_attention_backward_runs_in_fp32_and_matches():
    """Under CPU bf16 autocast, attention with head size < 64 is computed in fp32 when training (the
    bf16 flash backward is several times slower there); the gradients still match fp32's closely,
    and inference (no grad) keeps bf16."""
    from gpt.model import cpu_attention_upcast

    qkv = torch.randn(1, 4, 3 * 64, dtype=torch.bfloat16, requires_grad=True)  # (B, T, 3C), 2 heads
    assert cpu_attention_upcast(qkv, 32)
    assert not cpu_attention_upcast(qkv.detach(), 32)  # inference
    assert not cpu_attention_upcast(qkv, 64)
    assert not cpu_attention_upcast(torch.randn(1, 4, 192, requires_grad=True), 32)  # fp32 already
    model, idx = small(norm="rmsnorm", pos_emb="rope", bias=False).train(), torch.randint(0, 64, (2, 16))
    grads = {}
    for dtype in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(idx, idx)
        loss.backward()
        grads[dtype] = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    rel = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert rel < 0.05, rel
