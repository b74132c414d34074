"""Pure-PyTorch reference of the LoRA linear op: the CPU path and the kernels' ground truth.

    y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias)

Backward, with xa = drop(x)·Aᵀ saved from the forward and g = dY·B:

    dX = dY·W0 + s·(g·A) ⊙ mask      dA = s·gᵀ·drop(x)      dB = s·dYᵀ·xa

W0 is frozen: no gradient, and a 4-bit W0 is dequantised again in backward rather than saved.
The dropout mask is regenerated from a seed in backward instead of being stored.
"""

from __future__ import annotations

import contextlib

import torch

from ..quant import QuantizedWeight, dequantize

BaseWeight = torch.Tensor | QuantizedWeight


def autocast_off(device_type: str):
    """A context that turns autocast off, or a no-op one when it is off already (the common eager
    case: building a ``torch.autocast`` context costs host time on every call of an op)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NULL


_NULL = contextlib.nullcontext()


def base_weight_dense(base: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W0`` as a dense ``[N, K]`` tensor of ``dtype``."""
    if isinstance(base, QuantizedWeight):
        return dequantize(base, dtype)
    return base.to(dtype)


def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``s·(a·b)`` in ``out_dtype`` (default: a's) as one cuBLAS call: the scale is the GEMM's alpha
    (beta = 0 ignores the input). A LoRA gradient for fp32 parameters from bf16/fp16 operands is
    written in fp32 straight from the GEMM's fp32 accumulator on CUDA (``addmm``'s ``out_dtype``): no
    rounding to bf16 first, and no cast kernel after (the autograd engine casts a gradient whose dtype
    differs from its parameter's, one launch per parameter and step)."""
    global _OUT_DTYPE_MM
    dtype = out_dtype or a.dtype
    if dtype == a.dtype:
        return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)
    if _OUT_DTYPE_MM and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.addmm(a.new_empty((), dtype=dtype), a, b, dtype, beta=0, alpha=scaling)
        except (TypeError, NotImplementedError):  # a torch without the overload (or its kernel): cast
            _OUT_DTYPE_MM = False
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling).to(dtype)


# Whether this torch's CUDA addmm writes an fp32 result from bf16/fp16 operands (``out_dtype``, added
# in torch 2.8); cleared on the first call that finds it missing.
_OUT_DTYPE_MM = True


# Constants of the SplitMix64 finaliser, as signed int64 (torch integer arithmetic wraps).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _srl(h: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 ``h`` (torch's ``>>`` is arithmetic)."""
    return (h >> n) & ((1 << (64 - n)) - 1)


def dropout_mask(shape: torch.Size, p: float, seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The fp32 keep mask scaled by 1/(1-p), reproducible from ``seed`` alone: a counter-based draw
    (SplitMix64 of ``seed`` and the element's flat index) made of plain tensor ops, so a seed given as
    a device tensor is never read on the host and the mask traces into a torch.compile graph (no
    ``torch.Generator`` is created). An int and a 1-element integer tensor holding the same low 31
    bits give the same mask."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(device=device, dtype=torch.int64) & 0x7FFFFFFF
    else:
        s = torch.tensor(int(seed) & 0x7FFFFFFF, dtype=torch.int64, device=device)
    numel = 1
    for d in shape:
        numel *= d
    h = torch.arange(numel, dtype=torch.int64, device=device) + s * _GOLDEN
    h = h * _GOLDEN
    h = (h ^ _srl(h, 30)) * _MIX1
    h = (h ^ _srl(h, 27)) * _MIX2
    h = h ^ _srl(h, 31)
    u = _srl(h, 40).to(torch.float32) * (1.0 / (1 << 24))  # 24 random bits: uniform in [0, 1)
    keep = (u >= p).reshape(shape)
    return keep.to(torch.float32) / (1.0 - p)


def apply_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """``x`` times :func:`dropout_mask` (``x`` itself when ``p`` is 0), in x's dtype."""
    if p == 0.0:
        return x
    return (x * dropout_mask(x.shape, p, seed, x.device)).to(x.dtype)


class LoraLinearReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2 = x.reshape(-1, x.shape[-1])
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # grads come back cast by autograd
        w0 = base_weight_dense(base, x.dtype)
        xa = apply_dropout(x2, dropout_p, seed) @ lora_A.t()  # [M, r]
        y = torch.addmm(bias, x2, w0.t()) if bias is not None else x2 @ w0.t()
        y = y + scaling * (xa @ lora_B.t())
        ctx.save_for_backward(x2, xa, lora_A, lora_B)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.seed = base, scaling, dropout_p, seed
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        g = dy2 @ lora_B  # [M, r]
        dx = da = db = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ base_weight_dense(ctx.base, x2.dtype)
            lora_dx = (g @ lora_A) * s
            if p > 0.0:
                lora_dx = lora_dx * dropout_mask(x2.shape, p, ctx.seed, x2.device)
            dx = (dx + lora_dx).reshape(*dy.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[3]:
            da = (g.t() @ apply_dropout(x2, p, ctx.seed)) * s
        if ctx.needs_input_grad[4]:
            db = (dy2.t() @ xa) * s
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, None, dbias, da, db, None, None, None


def lora_linear_reference(
    x: torch.Tensor,
    base: BaseWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """``x·W0ᵀ + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ (+ bias)`` with an explicit backward.

    Args:
        x: ``[..., K]`` activations; a dense W0 and the bias must share its dtype; lora_A and lora_B
            may be any float dtype (cast to x's, their gradients returned in their own dtype).
        base: ``W0 [N, K]`` (dense, any strides) or a 4-bit :class:`QuantizedWeight`.
        lora_A: ``[r, K]``; lora_B: ``[N, r]``.
        scaling: the LoRA scale s.
        bias: ``[N]`` or None.
        dropout_p: dropout on the LoRA branch's input.
        seed: the dropout mask's seed, an int or a 1-element integer tensor (ignored when ``dropout_p == 0``).
    """
    return LoraLinearReference.apply(x, base, bias, lora_A, lora_B, scaling, dropout_p, seed)
