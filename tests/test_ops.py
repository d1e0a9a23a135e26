"""gpt.ops: the hand-written backward passes (rotary embedding, RMSNorm, ReLU²) give the gradients of
the plain expressions, in float64 with gradcheck and in float32 against autograd of the formulas;
the model with them trains as it did with the formulas."""

import pytest
import torch
import torch.nn.functional as F

from gpt.ops import relu_squared, rms_norm, rotate


def rotate_reference(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_reference(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("tables", ["per position", "per row and position"])
def test_rotate_matches_the_formula_and_its_gradient(tables):
    torch.manual_seed(0)
    B, T, H, hs = 2, 5, 3, 8
    x = torch.randn(B, T, H, hs, dtype=torch.float64, requires_grad=True)
    shape = (T, 1, hs // 2) if tables == "per position" else (B, T, 1, hs // 2)
    angles = torch.randn(shape, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    assert torch.allclose(rotate(x, cos, sin), rotate_reference(x, cos, sin))
    assert torch.autograd.gradcheck(lambda x: rotate(x, cos, sin), (x,))
    # a strided input, as the model passes it (queries and keys: a slice of the qkv matmul's output)
    qkv = torch.randn(B, T, 3 * H * hs, dtype=torch.float64, requires_grad=True)
    qk = qkv[..., : 2 * H * hs].view(B, T, 2 * H, hs)
    g = torch.randn(B, T, 2 * H, hs, dtype=torch.float64)
    (ours,) = torch.autograd.grad(rotate(qk, cos, sin), qkv, g)
    (ref,) = torch.autograd.grad(rotate_reference(qk, cos, sin), qkv, g)
    assert torch.allclose(ours, ref)


def test_rms_norm_matches_the_formula_and_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    g = torch.randn(4, 6, 32)
    y, ref = rms_norm(x, w, 1e-6), rms_reference(x, w, 1e-6)
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(y, F.rms_norm(x, (32,), w, 1e-6), atol=1e-6)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # a frozen gain (LoRA fine-tuning) gets no gradient, the input still does
    frozen = w.detach()
    (dx,) = torch.autograd.grad(rms_norm(x, frozen, 1e-6), (x,), g)
    assert torch.allclose(dx, torch.autograd.grad(rms_reference(x, frozen, 1e-6), (x,), g)[0], atol=1e-5)
    with torch.no_grad():  # inference takes the same forward
        assert torch.allclose(rms_norm(x, w, 1e-6), ref, atol=1e-6)


def test_rms_norm_gradcheck_in_float32_math():
    """The hand-written path runs for float32 on the CPU; gradcheck through it with a loose tolerance."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return rms_norm(x.float(), w.float(), 1e-6).double()

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-3, atol=2e-3)


def test_relu_squared_matches_the_formula_and_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.equal(relu_squared(h), F.relu(h).square())
    assert torch.autograd.gradcheck(relu_squared, (h,))
    hb = h.detach().bfloat16().requires_grad_()  # under autocast the MLP runs in bf16
    g = torch.randn(6, 10, dtype=torch.bfloat16)
    (ours,) = torch.autograd.grad(relu_squared(hb), hb, g)
    (ref,) = torch.autograd.grad(F.relu(hb).square(), hb, g)
    assert ours.dtype == torch.bfloat16 and torch.allclose(ours.float(), ref.float(), rtol=1e-2)
