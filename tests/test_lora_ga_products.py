"""fastlora.lora_ga.products: fp32 products of half-precision activations."""

from __future__ import annotations

import torch
from helpers import relerr

import fastlora.lora_ga.products as products
from fastlora.lora_ga import mm_wide, outer_fp32


def test_outer_fp32_bf16_inputs():
    x, dy = torch.randn(33, 7), torch.randn(33, 5)
    out = outer_fp32(dy.bfloat16(), x.bfloat16())
    assert out.dtype == torch.float32
    ref = dy.bfloat16().double().t() @ x.bfloat16().double()
    assert relerr(out, ref) < 1e-6


def test_mm_wide_half_times_fp32_keeps_fp32_precision(monkeypatch):
    """The hi/lo split: bf16 activations times an fp32 operand, as the GPU path runs it."""
    torch.manual_seed(0)
    x = torch.randn(300, 40).bfloat16()
    w = torch.randn(40, 7)
    truth = x.double() @ w.double()
    real_mm = torch.mm

    def mm(a, b, *, out_dtype=None):  # CPU stand-in for CUDA's mm(..., out_dtype=fp32): exact products
        assert out_dtype is None or (a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32)
        return real_mm(a.float(), b.float()) if out_dtype is not None else real_mm(a, b)

    monkeypatch.setattr(products, "mm_out_dtype_ok", lambda device, dtype: True)
    monkeypatch.setattr(torch, "mm", mm)
    for out in (mm_wide(x, w), mm_wide(w.t(), x.t()).t()):  # the wide operand on either side
        assert out.dtype == torch.float32
        assert relerr(out, truth) < 2e-5  # one bf16 rounding of w would give ~3e-3
    assert relerr(mm_wide(x, w.bfloat16()), x.double() @ w.bfloat16().double()) < 1e-6
    monkeypatch.undo()
    assert relerr(mm_wide(x, w), truth) < 1e-6  # CPU: plain upcast
