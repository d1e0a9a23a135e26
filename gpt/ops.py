"""Three elementwise pieces of the model with hand-written backward passes: the rotary embedding,
RMSNorm (on the CPU) and ReLU squared; the rotary embedding's tables (Llama 3's scaling too); and
``linear``, the model's linear layers at inference on the CPU in bf16 through oneDNN's prepacked weights;
and ``one_token_attention``, a decode step's attention on the CPU.

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
    y = linear(model.lm_head, x)  # = model.lm_head(x), faster when nothing needs gradients (CPU, bf16)
"""

from __future__ import annotations

import functools
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


def linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; for a plain ``nn.Linear`` in bf16 on the CPU with gradients off (inference), the
    same numbers through oneDNN's GEMM on a prepacked copy of the weight, made once per weight.

    Why: ``F.linear`` in bf16 hands oneDNN the plain (out, in) weight, which it re-lays out or reads
    with a generic kernel on every call; a batch-1 decode step is then far from the memory bandwidth
    (measured here at M=1, 1 thread: 1.3-1.9x slower than the packed weight on the four GPT-2 shapes,
    the 50304 x 768 head included; the packed weight is as fast or faster at M=16 and 512 too, and
    torch.compile's max-autotune picks this same kernel: docs/benchmarks.md "The batch-1 decode
    step"). The copy costs the weight's bytes again in memory (249 MB for GPT-2 124M; LoRA layers,
    int8 layers and fp32 weights are left alone). It is remade when the
    weight changes: another tensor (``.to``) or an in-place update (its version counter: an optimizer
    step, ``load_state_dict``); an inference tensor has no counter and is packed once.
    """
    if torch.compiler.is_compiling():  # inductor's freezing packs the weights itself (engine.compile_decode)
        return layer(x)
    weight = layer.weight if type(layer) is torch.nn.Linear else None
    bf16 = x.dtype == torch.bfloat16 and weight is not None and weight.dtype == torch.bfloat16
    if weight is None or not bf16 or torch.is_grad_enabled() or x.device.type != "cpu" or not _mkldnn_bf16():
        return layer(x)
    version = -1 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, weight.shape)
    cached = layer.__dict__.get("_packed")  # a plain attribute, never in the state dict
    if cached is None or cached.key != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # for M=1; as fast at 512
        cached = layer.__dict__["_packed"] = _Packed(key, packed)
    return torch.ops.mkldnn._linear_pointwise(x, cached.weight, layer.bias, "none", [], "")


class _Packed:
    """oneDNN's packed copy of a weight (an opaque tensor: it has no storage to copy) and the key of
    the weight it was made from. A deep copy of the layer gets None instead (deepcopy cannot copy an
    opaque tensor) and packs again at its first call."""

    __slots__ = ("key", "weight")

    def __init__(self, key: tuple, weight: torch.Tensor):
        self.key, self.weight = key, weight

    def __deepcopy__(self, memo: dict) -> None:
        return None


@functools.cache  # asked at every linear of every step: a dispatcher call costs microseconds
def _mkldnn_bf16() -> bool:
    """Whether this torch and CPU run oneDNN's bf16 kernels."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# from this many cached keys a decode step's attention is matmuls: below, SDPA's one kernel beats
# their dozen small ones (measured, 1 thread: 29 vs 39 us over 16 keys, 106 vs 59 us over 80)
ONE_TOKEN_MIN_KEYS = 64


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        min_keys: int = ONE_TOKEN_MIN_KEYS) -> torch.Tensor:  # fmt: skip
    """Attention of one new token per row over its cached keys: q (B, nh, 1, hs), k, v (B, nkv, S, hs),
    mask None or (B or 1, 1, 1, S), True where a key is seen; (B, nh, 1, hs). SDPA below ``min_keys``
    keys (and under autocast), else plain fp32 matmuls.

    Why: the CPU's SDPA (flash) kernel is slow for a single query: measured in bf16 at GPT-2's shapes
    (12 heads of 64), 1 thread, 106 / 187 / 3162 us per layer over 80 / 144 / 1024 cached keys, against
    59 / 92 / 915 us here (29 vs 39 us over 16; docs/benchmarks.md, "The batch-1 decode step"). The
    rounding is SDPA's (fp32 scores and sums, the weights in v's dtype before they meet v): bf16
    outputs equal its own but for SDPA's blocking. GQA: the nh / nkv query heads of a k/v head share
    its matmul.
    """
    B, nh, _, hs = q.shape
    nkv = k.size(1)
    # compiled (engine.compile_decode): always the matmuls, which inductor fuses; a branch on the
    # cache's length would recompile the step when it crosses min_keys
    small = not torch.compiler.is_compiling() and k.size(2) < min_keys  # compiling first: no guard
    if small or torch.is_autocast_enabled("cpu"):  # autocast would make the matmuls bf16
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
    q = q.float().reshape(B, nkv, nh // nkv, hs)  # the query heads sharing each k/v head
    scores = (q @ k.float().transpose(-1, -2)) * hs**-0.5  # (B, nkv, nh / nkv, S)
    if mask is not None:  # (B or 1, 1, 1, S) broadcasts over the heads
        scores = scores.masked_fill(~mask, float("-inf"))
    # SDPA's rounding: unnormalised weights in v's dtype times v, then divided by their fp32 sum
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    y = (weights.to(v.dtype).float() @ v.float()) / weights.sum(dim=-1, keepdim=True)  # (B, nkv, nh/nkv, hs)
    return y.to(v.dtype).view(B, nh, 1, hs)


FEW_TOKENS = 65
"""The most new tokens after cached ones that ``few_token_attention`` takes (draft_tokens' bound + 1)."""


def few_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of T new tokens after S - T cached ones in rows of equal length: q (B, nh, T, hs), k, v
    (B, nkv, S, hs); (B, nh, T, hs). Each query is computed as ``one_token_attention`` computes the
    decode step at its position (the same call on the same shapes: the keys up to itself).

    Why: speculative decoding checks k drafted tokens in one forward. SDPA over the T queries rounds
    differently from the one-token steps of plain decoding (bf16 logits differed in their last bits,
    near-ties flipped: greedy text was not plain decoding's in 4 of 10 Shakespeare prompts); with
    this and the packed bf16 GEMM (equal for 1 and T rows) the logits are the steps' to the bit.
    Attention is a few percent of a decode step: T calls cost little."""
    start = k.size(2) - q.size(2)
    return torch.cat(
        [one_token_attention(q[:, :, i : i + 1], k[:, :, : start + i + 1], v[:, :, : start + i + 1], None)
         for i in range(q.size(2))], dim=2,
    )  # fmt: skip
