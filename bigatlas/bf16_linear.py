"""A Linear layer's products on bfloat16 operands with float32 results, for the model's wide layers
(genes × hidden: the encoder's first layer and the decoder's heads) in CPU training with
`--mixed-precision bf16`, which `auto`, the default, is on CPUs with bfloat16 units (native_bf16).

CPUs with AMX or AVX-512 BF16 multiply bfloat16 matrices ~3× as fast as float32 ones (65-90 vs 195-220
µs for each of the eleven 128 × 2,000 × 128 products of a step on 2 threads: forward, weight and input
gradients). Only these products change: each operand is rounded to bfloat16 once (the weight and input
in the forward pass, kept for the backward; the output gradient there), the sums accumulate in float32
and come back as float32, and everything else of the step — BatchNorm, the small layers, the likelihood,
the optimizer and its float32 master weights — stays float32. CPU autocast instead casts every Linear and
leaves bfloat16 outputs for the float32 ops after it to cast back (no gain measured). GPUs keep autocast.
"""

from __future__ import annotations

import torch

DTYPE = torch.bfloat16


class _BF16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, keep: bool):
        xc, wc = x.to(DTYPE), weight.to(DTYPE)
        ctx.save_for_backward(xc, wc)
        if bias is None:
            out = torch.mm(xc, wc.t())
            return out if keep else out.float()
        if keep:
            return torch.addmm(bias.to(DTYPE), xc, wc.t())
        return torch.mm(xc, wc.t()).float().add_(bias)

    @staticmethod
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        gc = grad.to(DTYPE)
        gx = torch.mm(gc, wc).float() if ctx.needs_input_grad[0] else None
        gw = torch.mm(gc.t(), xc).float() if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.needs_input_grad[2]:  # a bfloat16 gradient (keep) sums in float32 into its bfloat16 rounding, as gw
            gb = grad.sum(0).float() if grad.dtype == DTYPE else grad.sum(0)
        return gx, gw, gb, None


def bf16_linear(x: torch.Tensor, layer: torch.nn.Linear, keep: bool = False) -> torch.Tensor:
    """layer(x) with its products on bfloat16 operands and its gradients float32. x: (cells, in) in float32
    or already bfloat16. The result is float32, or with keep the product's own bfloat16 (bias added in
    bfloat16) for a consumer that reads it as float32 itself: the fused loss, which then hands back its
    gradient in bfloat16 too (two casts of cells × genes fewer per head and step). A layer without a bias
    adds none."""
    return _BF16Linear.apply(x, layer.weight, layer.bias, keep)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16); elsewhere oneDNN
    emulates them, slower than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
