"""The CPU decode kernels of gpt.ops: ``linear`` (oneDNN's prepacked bf16 weights) gives exactly the
numbers of the layer itself and follows every change of the weight; ``one_token_attention`` is
SDPA's attention for one query (multi-head, grouped-query, ragged rows' masks); a bf16 model's
logits are the same with and without them."""

import pytest
import torch
import torch.nn.functional as F

from gpt.model import GPT, GPTConfig
from gpt.ops import linear, one_token_attention

PACKS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_the_layer_exactly_in_bf16(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # (B, T, C): any leading shape
    with torch.inference_mode():
        assert torch.equal(linear(layer, x), layer(x))
        assert torch.equal(linear(layer, x[:1, -1:]), layer(x[:1, -1:]))  # one row: a decode step
    assert ("_packed" in layer.__dict__) == PACKS


def test_linear_follows_updates_of_the_weight():
    """A packed copy must never go stale: an optimizer step (in place), load_state_dict and .to all
    change what the layer computes."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48).to(torch.bfloat16)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        linear(layer, x)  # packs
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x.float().bfloat16()).sum().backward()  # gradients on: the layer itself
    optimizer.step()
    with torch.inference_mode():
        assert torch.equal(linear(layer, x), layer(x))
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    with torch.inference_mode():
        assert torch.equal(linear(layer, x), layer(x))
    layer.float().to(torch.bfloat16)  # new tensors
    with torch.inference_mode():
        assert torch.equal(linear(layer, x), layer(x))


def test_linear_with_gradients_is_the_layer():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    linear(layer, x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # (nh, nkv): multi-head, GQA, multi-query
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_attention_is_sdpa(heads, masked):
    torch.manual_seed(0)
    (nh, nkv), B, S, hs = heads, 3, 70, 16
    q, k, v = torch.randn(B, nh, 1, hs), torch.randn(B, nkv, S, hs), torch.randn(B, nkv, S, hs)
    mask = None
    if masked:  # ragged rows: row b sees its first 70 - 20b keys
        mask = (torch.arange(S)[None, :] < torch.tensor([70, 50, 30])[:, None])[:, None, None]  # (B, 1, 1, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
    for min_keys in (0, S + 1):  # the matmuls, SDPA
        got = one_token_attention(q, k, v, mask, min_keys=min_keys)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_decode_logits_are_those_of_plain_layers():
    """The packed weights change no number: a bf16 model's forward under inference_mode (packed) and
    with gradients on (the layers themselves) give equal logits, prefill and one-token steps alike."""
    torch.manual_seed(0)
    # head size 64: with gradients on, smaller heads upcast attention to fp32 (cpu_attention_upcast)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=32, vocab_size=128))
    model = model.to(torch.bfloat16).eval()
    for T in (5, 1):
        idx = torch.randint(0, 128, (2, T))
        with torch.inference_mode():
            packed = model(idx)
        plain = model(idx).detach()
        assert torch.equal(packed, plain)
