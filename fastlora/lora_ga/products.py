"""The products every accumulator computes: ``dYᵀ·x`` and skinny products with test matrices, in
fp32 (fp64 for fp64 inputs) without rounding a half-precision operand's product to half precision."""

from __future__ import annotations

import torch

__all__ = ["mm_out_dtype_ok", "mm_wide", "outer_fp32"]

_WIDE = (torch.float32, torch.float64)
_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on ``device``.

    It lets a bf16 product accumulate and come out in fp32 without upcasting the (large) operands.
    Newer PyTorch has it on CUDA only; probed once per (device type, dtype).
    """
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, device=device, dtype=dtype)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[key] = ok
    return _MM_OUT_DTYPE[key]


def outer_fp32(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dyᵀ·x`` in fp32 (``[N, K]`` from ``dy [M, N]``, ``x [M, K]``); added into ``out`` if given.

    fp32 and fp64 inputs multiply in their own precision; half-precision inputs are multiplied with
    fp32 output where the backend can (no rounding of the product to bf16, unlike ``.grad`` of a
    bf16 weight), else upcast.
    """
    if dy.dtype != x.dtype or not dy.is_floating_point():
        dtype = torch.promote_types(torch.promote_types(dy.dtype, x.dtype), torch.float32)
        dy, x = dy.to(dtype), x.to(dtype)
    if dy.dtype in (torch.float32, torch.float64):
        part = None
        if out is not None and out.dtype == dy.dtype:
            return out.addmm_(dy.t(), x)
        part = dy.t() @ x
    elif mm_out_dtype_ok(dy.device, dy.dtype):
        part = torch.mm(dy.t(), x, out_dtype=torch.float32)
    else:
        part = dy.t().float() @ x.float()
    if out is None:
        return part.float() if part.dtype != torch.float64 else part
    return out.add_(part)


def _split_hi_lo(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(dtype)
    return hi, (t - hi.to(t.dtype)).to(dtype)


def mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 (fp64 if either is fp64) result, never rounding an operand to less
    than its own precision.

    Two half-precision operands: a GEMM with fp32 output where the backend has one. One
    half-precision and one wide operand: the wide one is split into a high and a low half-precision
    part (``t ≈ hi + lo`` to ~16 mantissa bits), both multiplied in one GEMM with fp32 output, so the
    large activation is never upcast. Elsewhere (CPU half precision), both are upcast.
    """
    if a.dtype in _WIDE and b.dtype in _WIDE:
        dt = torch.promote_types(a.dtype, b.dtype)
        return a.to(dt) @ b.to(dt)
    if a.dtype == b.dtype:
        if mm_out_dtype_ok(a.device, a.dtype):
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    half = b.dtype if a.dtype in _WIDE else a.dtype
    if a.dtype not in _WIDE and b.dtype not in _WIDE:  # two different half types
        return a.float() @ b.float()
    if torch.float64 in (a.dtype, b.dtype) or not mm_out_dtype_ok(a.device, half):
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dt) @ b.to(dt)
    if a.dtype in _WIDE:
        hi, lo = _split_hi_lo(a, half)
        out = torch.mm(torch.cat([hi, lo], 0), b, out_dtype=torch.float32)
        return out[: a.shape[0]] + out[a.shape[0] :]
    hi, lo = _split_hi_lo(b, half)
    out = torch.mm(a, torch.cat([hi, lo], 1), out_dtype=torch.float32)
    return out[:, : b.shape[1]] + out[:, b.shape[1] :]
