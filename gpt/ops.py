"""Three elementwise pieces of the model with hand-written backward passes: the rotary embedding,
RMSNorm (on the CPU) and ReLU squared; and the rotary embedding's tables (Llama 3's scaling too).

Why: at the shapes a CPU trains (4 x 128, 768 tokens a step), a step spends as much time in these
elementwise kernels as in the matmuls, and eager autograd runs several kernels per forward kernel
for them. RoPE's chunk and cat backward allocates, zero-fills and copies. ``F.rms_norm`` on the CPU
is composite both ways: about 15 kernels forward and 14 backward (only CUDA has fused ones). ReLU²'s
``pow`` backward recomputes ``x ** 1``. Here each backward is the math itself: a rotation by the
opposite angle, RMSNorm's closed form (mostly in LayerNorm's fused kernel), ``2 relu(x) g`` in one
kernel. docs/benchmarks.md ("The eager CPU step, second pass") has the measurements.

Under ``torch.compile`` each function is the plain expression instead, which inductor fuses forward
and backward better than any hand-written pass. tests/test_ops.py checks the values and gradients
against the plain expressions.

    from gpt.ops import relu_squared, rms_norm, rope_frequencies, rope_tables, rotate
    cos, sin = rope_tables(rope_frequencies(hs, theta=10000.0), length)  # (length, hs / 2) each
    y = rotate(x, cos, sin)       # x (..., hs); cos, sin broadcast to (..., hs / 2)
    y = rms_norm(x, weight, eps)  # over the last dimension
    y = relu_squared(h)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope_frequencies(
    head_size: int, theta: float, factor: float = 1.0, low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0, original_max_position: int = 8192,
) -> torch.Tensor:  # fmt: skip
    """(head_size // 2,) the angle per position of each rotated pair (i, i + head_size / 2):
    theta^(-2i / head_size); with Llama 3's scaling when factor != 1, as transformers'
    ``_compute_llama3_parameters``: wavelengths longer than original_max_position / low_freq_factor
    are stretched by factor, those shorter than original_max_position / high_freq_factor kept, and
    those between interpolated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    if factor == 1.0:
        return inv_freq
    low, high, old = low_freq_factor, high_freq_factor, original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_size // 2) of the angles position * inv_freq (fp32)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """(x1 cos - sign x2 sin, x2 cos + sign x1 sin) for the halves x1, x2 of x's last dimension, in
    four kernels writing a new contiguous tensor (no temporaries and no cat)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)  # the tables only: a rotation's inverse needs no input
        return _rotate_into(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_into(grad, cos, sin, -1.0), None, None  # rotation by the opposite angle


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: rotate the pairs (first half, second half) of x's last dimension by the
    angles whose cos and sin are given (broadcast to x's shape with the last dimension halved)."""
    if torch.compiler.is_compiling():
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return _Rotate.apply(x, cos, sin)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd (..., 1)) in one reduction and two passes over x. ``F.rms_norm`` on the CPU is
    about 15 kernels, 4 of them passes over x; this is 1.4-1.6x faster at (12, 64, 128)-(32, 128, 128)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # sqrt(sum x^2): (..., 1)
    rstd = norm.square_().div_(x.size(-1)).add_(eps).rsqrt_()  # 1 / sqrt(mean x^2 + eps)
    return torch.mul(x, rstd).mul_(weight), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        # RMSNorm's dx = rstd * (g w - xhat * mean(g w xhat)), xhat = x * rstd. LayerNorm's fused
        # backward kernel, told the mean is 0, computes that minus rstd * mean(g w), and RMSNorm's
        # dw = sum(g xhat): three kernels instead of the eight the formula takes one by one.
        need_w = ctx.needs_input_grad[1]  # a frozen gain (LoRA) needs no gradient
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [x.size(-1)], torch.zeros_like(rstd), rstd, weight, None, [True, need_w, False]
        )
        mean_gw = (grad @ weight).unsqueeze(-1) / x.size(-1)  # (..., 1); all fp32 on this path
        # + rstd * mean(g w): the (..., 1) product first, then one broadcast add into dx (addcmul
        # with two broadcast operands takes a slow path on the CPU: 3x the time at (12, 64, 128))
        return dx.add_(rstd * mean_gw), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with a gain: x / sqrt(mean(x^2) + eps) * weight."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if cpu_fp32 and not torch.compiler.is_compiling():
        if torch.is_grad_enabled():
            return _RMSNorm.apply(x, weight, eps)
        return _rms_norm_forward(x, weight, eps)[0]
    return F.rms_norm(x, (x.size(-1),), weight, eps)  # bf16 (upcast inside), CUDA (fused both ways)


class _ReLUSquared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (r,) = ctx.saved_tensors
        # d relu(x)^2 / dx = 2 relu(x): one kernel (0 + 2 g r, the 0 broadcast)
        return torch.addcmul(grad.new_zeros(()), grad, r, value=2.0)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2, the MLP nonlinearity of ``model.activation=relu2``."""
    if torch.compiler.is_compiling():
        return F.relu(x).square()
    return _ReLUSquared.apply(x)
