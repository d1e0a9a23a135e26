"""Int8 weight-only inference: every ``nn.Linear`` of a built model (the output head included) keeps
its weight as int8 with one scale per output channel; activations stay in the compute dtype.

A batch-1 decode step reads every weight once, so on a CPU it is bound by memory bandwidth: int8
weights read half the bytes of bf16. ``torch._weight_int8pack_mm`` (torch's own GEMV for int8
weights, what gpt-fast uses on CPU) multiplies without materialising the float weight; it is fast
for a few rows in bf16/fp16 only, so wider inputs (a prompt's prefill, a batch of 16) and fp32
dequantize and use the ordinary matmul (bench/bench_int8.py measures both).

    from gpt.quant import quantize_model
    quantize_model(model, "int8")   # in place, on the fp32 weights; then model.to(device, dtype)

The one caller is ``gpt.runs.load.Loaded.build(device, quantize=...)``; sample.py, the REPLs,
``gpt serve`` and ``gpt eval`` take the key ``quantize`` (none | int8) and pass it there.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import CheckpointError

Quantize = Literal["none", "int8"]  # the key's values: the config dataclasses check them
# at most this many rows go through torch's int8 GEMV; it loses to dequantize-then-matmul beyond
# (measured on this CPU, bf16, 3072x768: 1 row 0.7x the bf16 time, 4 rows 1.1x, 16 rows 3.8x)
GEMV_ROWS = 4


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (out, in) ~= q (out, in) int8 * scales (out,) fp32,
    with q in [-127, 127] (no -128: the grid is symmetric around 0)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (out,)
    if not torch.isfinite(amax).all():
        raise CheckpointError("quantize=int8: the model's weights hold inf or NaN; it cannot be quantized")
    scales = amax.clamp(min=1e-12) / 127  # an all-zero row keeps q = 0 (no division by zero)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scales + bias: an ``nn.Linear`` with int8 weights, for inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scales = int8_per_channel(linear.weight)
        # a frozen parameter, not a buffer: num_params counts it; .to(dtype) leaves integers alone
        self.qweight = nn.Parameter(q, requires_grad=False)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,), cast with the model to the compute dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The scales (out,): inference reads ``model.lm_head.weight`` for the model's device and
        compute dtype (the KV cache's dtype), which these carry; there is no float weight matrix."""
        return self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (rows, in)
        scales = self.scales.to(x.dtype)
        if x2.size(0) <= GEMV_ROWS and x.dtype != torch.float32:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, scales)  # (rows, out)
        else:  # exact in any float dtype: |q| <= 127 is representable in bf16 and fp16
            y = F.linear(x2, self.qweight.to(x.dtype)) * scales
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], -1)


def quantize_model(model: nn.Module, quantize: Quantize) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an ``Int8Linear`` (in place; ``quantize="none"``
    changes nothing). Inference only: LoRA adapters must be merged first (``Loaded.build`` does)."""
    if quantize == "none":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # exactly: a LoRALinear left here is refused below
                setattr(parent, name, Int8Linear(child))
            elif isinstance(child, nn.Linear):
                raise CheckpointError(f"quantize={quantize}: {type(child).__name__} layers cannot be "
                                      "quantized; merge the LoRA adapters first (gpt merge)")  # fmt: skip
    return model
