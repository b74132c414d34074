"""The Triton kernels and the fused op against float64 ground truth and the reference op.

Without a GPU everything runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest before any kernel is decorated) on small shapes; tests marked ``gpu`` repeat the checks at
real sizes on CUDA, plus bitsandbytes' own CUDA dequantisation, torch.compile and CUDA graphs.
Every op output is allocated NaN-poisoned (the ``poison_empty`` fixture), inputs are fresh random
draws on every run, and each case checks both ways the forward merges the LoRA term ("cat": one GEMM
over ``[x | s·xa]``; "addmm": a cuBLAS epilogue).
"""

from __future__ import annotations

import math

import pytest
import torch
from fastlora.kernels import dropout_keep_mask
from helpers import relerr

from fastlora.ops import fused
from fastlora.ops.reference import lora_linear_reference
from fastlora.quant import dequantize, quantize_4bit

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
MERGES = ["cat", "addmm"]


def _force_merge(monkeypatch, merge):
    """Make the forward merge the LoRA term by ``merge`` whatever M is (the rule is tested apart)."""
    monkeypatch.setattr(fused, "_fwd_cat", lambda *a, **k: merge == "cat")


def _seedless_randn(*shape, dtype=torch.float32, device=DEV, scale=1.0):
    # Fresh inputs every run: no fixed seed (torch's default generator continues across tests).
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _base(n, k, kind, dtype, device=DEV, blocksize=64):
    w = torch.randn(n, k, device=device) / math.sqrt(k)
    if kind == "dense":
        return w.to(dtype)
    return quantize_4bit(w, blocksize=blocksize, quant_type=kind.split("-")[0], compress_statistics="nested" in kind)


def _truth(x, base, A, B, s, bias, dy, keep=None, p=0.0):
    """float64 ground truth of y and (dx, dA, dB) with W0 as the op sees it (in x's dtype)."""
    w0 = (dequantize(base, x.dtype) if not isinstance(base, torch.Tensor) else base).double()
    x2 = x.reshape(-1, x.shape[-1]).double()
    dy2 = dy.reshape(-1, dy.shape[-1]).double()
    A, B = A.double(), B.double()
    xd = x2 if keep is None else x2 * keep.double() / (1.0 - p)
    xa = xd @ A.t()
    y = x2 @ w0.t() + s * xa @ B.t()
    if bias is not None:
        y = y + bias.double()
    g = dy2 @ B
    lora_dx = s * g @ A
    if keep is not None:
        lora_dx = lora_dx * keep.double() / (1.0 - p)
    dx = dy2 @ w0 + lora_dx
    return y.reshape(dy.shape), dx.reshape(x.shape), s * g.t() @ xd, s * dy2.t() @ xa


def _run(x, base, A, B, s, bias, p=0.0, seed=0, dy=None):
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    y = fused.lora_linear_fused(x, base, A, B, s, bias, p, seed)
    if dy is None:
        dy = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    return y, dx, dA, dB, dy


def _check(merge, m_shape, k, n, r, kind, dtype=torch.bfloat16, bias=True, tol=1e-2, p=0.0, device=DEV):
    mp = pytest.MonkeyPatch()
    _force_merge(mp, merge)
    base = _base(n, k, kind, dtype, device)
    x = _seedless_randn(*m_shape, k, dtype=dtype, device=device)
    A = _seedless_randn(r, k, dtype=dtype, device=device, scale=1 / math.sqrt(k))
    B = _seedless_randn(n, r, dtype=dtype, device=device, scale=0.5)
    b = _seedless_randn(n, dtype=dtype, device=device) if bias else None
    s = 2.0
    seed = int(torch.randint(0, 2**62, (1,)).item())
    assert fused.supports(x, base, A, B, b, p)
    try:
        y, dx, dA, dB, dy = _run(x, base, A, B, s, b, p, seed)
    finally:
        mp.undo()
    keep = dropout_keep_mask(x.numel() // k, k, p, seed, device) if p > 0 else None
    ty, tdx, tdA, tdB = _truth(x, base, A, B, s, b, dy, keep, p)
    assert y.shape == (*m_shape, n) and y.dtype == dtype and dx.shape == x.shape
    errs = dict(y=relerr(y, ty), dx=relerr(dx, tdx), dA=relerr(dA, tdA), dB=relerr(dB, tdB))
    assert all(e < tol for e in errs.values()), (merge, errs)
    return errs


# ------------------------------------------------------------------------------------------------
# dequantisation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("shape", "blocksize"), [((72, 40), 64), ((17, 33), 128), ((40, 264), 32), ((9, 520), 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_bit_exact_vs_reference(quant_type, nested, shape, blocksize, dtype, poison_empty):
    from fastlora.kernels import dequant_4bit

    qw = quantize_4bit(
        torch.randn(*shape, device=DEV), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    ref = dequantize(qw, dtype)
    out = dequant_4bit(
        qw.packed, qw.absmax, qw.quant_type, qw.shape, qw.blocksize, dtype,
        absmax2=qw.absmax2, code2=qw.code2, blocksize2=qw.blocksize2, offset=qw.offset,
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_dequant_into_wider_buffer_leaves_tail(poison_empty):
    from fastlora.kernels import dequant_4bit

    qw = quantize_4bit(torch.randn(24, 40, device=DEV), blocksize=64)
    buf = torch.full((24, 48), 7.0, dtype=torch.bfloat16, device=DEV)
    dequant_4bit(qw.packed, qw.absmax, "nf4", qw.shape, 64, torch.bfloat16, absmax2=qw.absmax2,
                 code2=qw.code2, offset=qw.offset, out=buf)  # fmt: skip
    assert torch.equal(buf[:, :40], dequantize(qw, torch.bfloat16))
    assert (buf[:, 40:] == 7.0).all()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("rows", "k"), [((72, 17, 40), 40), ((33, 9), 72), ((5,), 33)])
def test_dequant_group_bit_exact(rows, k, nested, poison_empty):
    """Up to three weights stacked in one launch, row counts that are not multiples of the row tile
    (odd K too): each block of rows bit-equal to its own dequantisation, the buffer's tail untouched."""
    from fastlora.kernels import Packed4bit, dequant_group, groupable

    qws = [quantize_4bit(torch.randn(n, k, device=DEV), blocksize=64, compress_statistics=nested) for n in rows]
    views = [
        Packed4bit(q.packed, q.absmax, "nf4", q.shape, 64, q.absmax2, q.code2, q.blocksize2, q.offset) for q in qws
    ]
    assert groupable(views)
    buf = torch.full((sum(rows), k + 8), 7.0, dtype=torch.bfloat16, device=DEV)
    dequant_group(views, torch.bfloat16, buf)
    ref = torch.cat([dequantize(q, torch.bfloat16) for q in qws])
    assert torch.equal(buf[:, :k].view(torch.int16), ref.view(torch.int16))
    assert (buf[:, k:] == 7.0).all()


def test_dequant_group_refuses_mixed_weights():
    from fastlora.kernels import Packed4bit, dequant_group, groupable

    def view(k, bs):
        q = quantize_4bit(torch.randn(8, k, device=DEV), blocksize=bs)
        return Packed4bit(q.packed, q.absmax, "nf4", q.shape, bs, q.absmax2, q.code2, q.blocksize2, q.offset)

    buf = torch.empty(16, 64, dtype=torch.bfloat16, device=DEV)
    for views in ([view(64, 64), view(32, 64)], [view(64, 64), view(64, 128)], [view(64, 64)] * 4):
        assert not groupable(views)
        with pytest.raises(ValueError, match="one K and one quantisation"):
            dequant_group(views, torch.bfloat16, buf)


@pytest.mark.parametrize("lookup", ["select", "gather1d"])
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("fp4", False)])
def test_dequant_lookups_bit_identical(lookup, quant_type, nested, poison_empty):
    """Every code lookup gives the default's values bit for bit (odd K: the per-element path too)."""
    from fastlora.kernels import dequant_4bit

    for shape, bs in (((40, 72), 64), ((17, 33), 128)):
        qw = quantize_4bit(
            torch.randn(*shape, device=DEV), blocksize=bs, quant_type=quant_type, compress_statistics=nested
        )
        args = (qw.packed, qw.absmax, quant_type, qw.shape, bs, torch.bfloat16)
        kw = dict(absmax2=qw.absmax2, code2=qw.code2, blocksize2=qw.blocksize2, offset=qw.offset)
        assert torch.equal(dequant_4bit(*args, **kw, lookup=lookup), dequant_4bit(*args, **kw))
    with pytest.raises(ValueError, match="select, gather, gather1d"):
        dequant_4bit(*args, **kw, lookup="table")


# ------------------------------------------------------------------------------------------------
# the op against float64 truth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested", "fp4"])
@pytest.mark.parametrize(
    ("m_shape", "k", "n", "r"),
    [((1,), 40, 72, 1), ((3,), 72, 40, 8), ((17,), 40, 40, 16), ((2, 3), 72, 72, 64), ((1, 17), 40, 72, 8)],
)
def test_op_vs_float64(merge, kind, m_shape, k, n, r, poison_empty):
    _check(merge, m_shape, k, n, r, kind)


@pytest.mark.parametrize("merge", MERGES)
def test_op_fp16_and_fp32(merge, poison_empty):
    _check(merge, (17,), 72, 40, 8, "nf4-nested", dtype=torch.float16)
    _check(merge, (5,), 40, 72, 16, "dense", dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("merge", MERGES)
def test_op_odd_in_features(merge, poison_empty):
    """K odd: 4-bit pairs straddle rows (the per-element nibble path)."""
    _check(merge, (9,), 33, 40, 8, "nf4-nested", bias=False)


def test_op_large_feature_dims(poison_empty):
    """K = 4096 + 8 (not a multiple of any tile), M = 1000, the cat merge."""
    _check("cat", (1000,), 4104, 72, 16, "nf4-nested")


def test_noncontiguous_x_and_conv1d_style_base(poison_empty, monkeypatch):
    """x a transposed view; W0 a transposed view (as transformers' Conv1D weight gives)."""
    for merge in MERGES:
        _force_merge(monkeypatch, merge)
        x = torch.randn(40, 9, device=DEV, dtype=torch.bfloat16).t()  # [9, 40], strides (1, 9)
        w = torch.randn(40, 72, device=DEV, dtype=torch.bfloat16).t() / 8  # [72, 40] view
        A = torch.randn(8, 40, device=DEV, dtype=torch.bfloat16) / 8
        B = torch.randn(72, 8, device=DEV, dtype=torch.bfloat16)
        y, dx, dA, dB, dy = _run(x, w, A, B, 0.5, None)
        ty, tdx, tdA, tdB = _truth(x, w, A, B, 0.5, None, dy)
        assert max(relerr(y, ty), relerr(dx, tdx), relerr(dA, tdA), relerr(dB, tdB)) < 1e-2, merge


# ------------------------------------------------------------------------------------------------
# the LoRA contribution itself (issue 3): fp32, tiny B
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested"])
def test_lora_contribution_fp32(merge, kind, poison_empty, monkeypatch):
    _force_merge(monkeypatch, merge)
    m, k, n, r, s = 17, 72, 40, 8, 2.0
    base = _base(n, k, kind, torch.float32)
    w0 = base if kind == "dense" else dequantize(base, torch.float32)
    x = torch.randn(m, k, device=DEV)
    A = torch.randn(r, k, device=DEV) / math.sqrt(k)
    B = torch.randn(n, r, device=DEV)
    B = B * (1e-3 * w0.norm() / (s * (B @ A).norm()))  # |s·B·A| ≈ 1e-3 |W0|
    dy = torch.randn(m, n, device=DEV)
    y, _, dA, dB, _ = _run(x, base, A, B, s, None, dy=dy)
    y0 = fused.lora_linear_fused(x, base, A, torch.zeros_like(B), s)
    yr, _, rA, rB, _ = _run_ref(x, base, A, B, s, dy)
    yr0 = lora_linear_reference(x, base, A, torch.zeros_like(B), s)
    assert relerr(y - y0, yr - yr0) < 1e-3
    assert relerr(dA, rA) < 1e-4 and relerr(dB, rB) < 1e-4


def _run_ref(x, base, A, B, s, dy):
    x, A, B = (t.detach().requires_grad_() for t in (x, A, B))
    y = lora_linear_reference(x, base, A, B, s)
    return (y, *torch.autograd.grad(y, (x, A, B), dy), dy)


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", MERGES)
def test_dropout_grads_match_truth_with_the_kernels_mask(merge, poison_empty):
    _check(merge, (2, 9), 72, 40, 8, "nf4-nested", p=0.25)


def test_dropout_mask_statistics_and_seeds():
    p = 0.3
    keep = dropout_keep_mask(64, 256, p, 1234, DEV)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02  # 16384 draws: sd ≈ 0.0036
    assert not torch.equal(keep, dropout_keep_mask(64, 256, p, 1235, DEV))
    assert torch.equal(keep, dropout_keep_mask(64, 256, p, 1234, DEV))
    # seeds are reduced to 31 bits the same way everywhere
    assert torch.equal(dropout_keep_mask(8, 64, p, 2**40 + 5, DEV), dropout_keep_mask(8, 64, p, 5, DEV))


def test_dropout_same_seed_same_output_and_expectation():
    k, n, r = 64, 40, 8
    x = torch.randn(32, k, device=DEV)
    w = torch.randn(n, k, device=DEV) / 8
    A, B = torch.randn(r, k, device=DEV) / 8, torch.randn(n, r, device=DEV)
    y1 = fused.lora_linear_fused(x, w, A, B, 1.0, None, 0.5, 7)
    y2 = fused.lora_linear_fused(x, w, A, B, 1.0, None, 0.5, 7)
    y3 = fused.lora_linear_fused(x, w, A, B, 1.0, None, 0.5, 8)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # E[drop(x)] = x: the average over many seeds approaches the no-dropout output
    mean = sum(fused.lora_linear_fused(x, w, A, B, 1.0, None, 0.5, s) for s in range(40)) / 40
    y0 = fused.lora_linear_fused(x, w, A, B, 1.0)
    lora0 = y0 - x @ w.t()
    assert relerr(mean - x @ w.t(), lora0) < 0.25  # 40 draws of p=0.5: ~1/sqrt(40) noise


def test_dropout_seed_tensor_equals_int_seed(poison_empty):
    """A seed given as a device tensor (what LoraLinear draws, read by the kernels, never by the host)
    drops exactly what the same int seed drops, in forward and backward; int64 seeds keep 31 bits."""
    k, n, r = 64, 40, 8
    x = torch.randn(12, k, device=DEV)
    w = torch.randn(n, k, device=DEV) / 8
    A, B = torch.randn(r, k, device=DEV) / 8, torch.randn(n, r, device=DEV)
    outs = []
    for seed in (7, torch.tensor([7], dtype=torch.int32, device=DEV), torch.tensor(2**40 + 7, device=DEV)):
        xi, Ai, Bi = (t.clone().requires_grad_() for t in (x, A, B))
        y = fused.lora_linear_fused(xi, w, Ai, Bi, 1.0, None, 0.5, seed)
        y.square().sum().backward()
        outs.append((y, xi.grad, Ai.grad, Bi.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one integer"):
        fused.lora_linear_fused(x, w, A, B, 1.0, None, 0.5, torch.tensor([1.5], device=DEV))


def test_layer_dropout_seed_stays_on_device(monkeypatch):
    """LoraLinear with dropout on the Triton backend: no host read of the seed (``Tensor.item`` and
    ``int(tensor)`` are never called), and torch.manual_seed makes the step repeatable."""
    from fastlora import _backend
    from fastlora.layer import LoraLinear

    lin = torch.nn.Linear(64, 40).to(DEV)
    layer = LoraLinear(lin, r=8, lora_alpha=16, dropout=0.3).to(DEV)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 64, device=DEV)
    _backend.set_backend("triton")
    try:

        def no_item(self):
            raise AssertionError("host read of a tensor during the forward")

        outs = []
        for _ in range(2):
            torch.manual_seed(11)
            with monkeypatch.context() as mp:
                mp.setattr(torch.Tensor, "item", no_item)
                mp.setattr(torch.Tensor, "__int__", no_item)  # what the reference path's int(seed) calls
                y = layer(x)
            outs.append(y)
        torch.manual_seed(12)
        y3 = layer(x)
    finally:
        _backend.set_backend("auto")
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], y3)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def test_backend_switch_routes_to_fused(monkeypatch):
    from fastlora import _backend
    from fastlora.ops import lora_linear

    x = torch.randn(5, 40, device=DEV, dtype=torch.bfloat16)
    qw = quantize_4bit(torch.randn(72, 40, device=DEV), blocksize=64)
    A = torch.randn(8, 40, device=DEV, dtype=torch.bfloat16) / 8
    B = torch.randn(72, 8, device=DEV, dtype=torch.bfloat16)
    calls = []
    real = fused.lora_linear_fused
    monkeypatch.setattr(fused, "lora_linear_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_backend, "_backend", "triton")
    y = lora_linear(x, qw, A, B, 0.5)
    assert calls and relerr(y, lora_linear_reference(x, qw, A, B, 0.5)) < 1e-2


def test_supports_refuses_what_it_cannot_run():
    x = torch.randn(3, 40, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(72, 40, device=DEV, dtype=torch.bfloat16)
    A, B = torch.randn(8, 40, device=DEV, dtype=torch.bfloat16), torch.randn(72, 8, device=DEV, dtype=torch.bfloat16)
    assert fused.supports(x, w, A, B)
    assert not fused.supports(x, w.float(), A, B)  # mixed dtypes: the caller casts first
    assert not fused.supports(x.to(torch.int32), w, A, B)
    assert not fused.supports(x, w, A[:, :32], B)  # shapes that do not fit


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(4096, 4104), (1000, 72), (72, 40)])
def test_gpu_dequant_bit_exact_vs_bitsandbytes(quant_type, nested, blocksize, shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from fastlora.kernels import dequant_4bit

    w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    ref = bnbf.dequantize_4bit(packed, qs)
    kw = {}
    if nested:
        kw = dict(absmax2=qs.state2.absmax, code2=qs.state2.code, blocksize2=qs.state2.blocksize,
                  offset=torch.as_tensor(qs.offset, dtype=torch.float32, device="cuda"))  # fmt: skip
    out = dequant_4bit(packed, qs.absmax, quant_type, tuple(qs.shape), qs.blocksize, torch.bfloat16, **kw)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_gpu_dequant_group_bit_exact_vs_bitsandbytes(nested):
    """q/k/v-like widths of one K in one launch: each block bit-equal to bitsandbytes' dequantisation."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from fastlora.kernels import Packed4bit, dequant_group

    k, views, refs = 4104, [], []
    for n in (4104, 1000, 72):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)  # bnb's default: fp4
        refs.append(bnbf.dequantize_4bit(packed, qs))
        nest = (qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset.reshape(1).float()) if nested else ()
        views.append(Packed4bit(packed, qs.absmax, "nf4", (n, k), qs.blocksize, *nest))
    out = dequant_group(
        views, torch.bfloat16, torch.empty(sum(v.shape[0] for v in views), k, dtype=torch.bfloat16, device="cuda")
    )
    assert torch.equal(out.view(torch.int16), torch.cat(refs).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested"])
@pytest.mark.parametrize(
    ("m_shape", "k", "n", "r"),
    [
        ((1,), 4104, 72, 16),
        ((3,), 40, 4104, 1),
        ((17,), 4096, 4096, 64),
        ((4, 250), 4104, 4104, 16),
        ((1000,), 72, 40, 8),
    ],
)
def test_gpu_op_vs_float64(merge, kind, m_shape, k, n, r, poison_empty):
    _check(merge, m_shape, k, n, r, kind, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
def test_gpu_lora_contribution_dropout_fp16(merge, poison_empty):
    _check(merge, (2, 256), 1024, 512, 16, "nf4-nested", p=0.1, device="cuda")
    _check(merge, (64,), 1024, 512, 16, "nf4", dtype=torch.float16, device="cuda")
    _check(merge, (300,), 512, 1024, 8, "dense", dtype=torch.float32, tol=1e-5, device="cuda")


@pytest.mark.gpu
def test_gpu_lora_contribution_fp32_large(monkeypatch):
    for merge in MERGES:
        _force_merge(monkeypatch, merge)
        m, k, n, r, s = 512, 1024, 768, 16, 2.0
        base = quantize_4bit(torch.randn(n, k, device="cuda") / 32, blocksize=64)
        w0 = dequantize(base, torch.float32)
        x = torch.randn(m, k, device="cuda")
        A = torch.randn(r, k, device="cuda") / 32
        B = torch.randn(n, r, device="cuda")
        B = B * (1e-3 * w0.norm() / (s * (B @ A).norm()))
        dy = torch.randn(m, n, device="cuda")
        y, _, dA, dB, _ = _run(x, base, A, B, s, None, dy=dy)
        y0 = fused.lora_linear_fused(x, base, A, torch.zeros_like(B), s)
        yr, _, rA, rB, _ = _run_ref(x, base, A, B, s, dy)
        yr0 = lora_linear_reference(x, base, A, torch.zeros_like(B), s)
        assert relerr(y - y0, yr - yr0) < 1e-3, merge
        assert relerr(dA, rA) < 1e-4 and relerr(dB, rB) < 1e-4, merge


def _graph_case():
    m, k, n, r = 64, 512, 768, 16
    base = quantize_4bit(torch.randn(n, k, device="cuda") / 16, blocksize=64)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, k, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    B = torch.randn(n, r, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return base, x, A, B


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    base, x, A, B = _graph_case()

    def f(x, A, B):
        return fused.lora_linear_fused(x, base, A, B, 0.5).float().square().sum()

    eager = f(x, A, B)
    compiled = torch.compile(f, fullgraph=True)(x, A, B)  # fullgraph: a graph break raises
    assert relerr(compiled, eager) < 1e-3
    gx = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, A, B), x)[0]
    assert relerr(gx, torch.autograd.grad(f(x, A, B), x)[0]) < 1e-2


def test_layer_with_dropout_compiles_fullgraph():
    """A LoraLinear with dropout in training mode compiles with fullgraph=True (no graph break; that
    no host read happens is checked by ``test_layer_dropout_seed_stays_on_device``: whether Dynamo
    breaks the graph at ``.item()`` depends on its version and ``capture_scalar_outputs``, and torch
    2.13 traced it here) and matches eager for the same
    torch.manual_seed once Inductor draws random numbers as eager does (``fallback_random``; by default
    compiled RNG is another stream, so the seed and the mask differ -- relerr 0.07 on the H100 at
    p = 0.1). The config must be set when the graph is compiled, hence the reset. On the CPU: a dense
    fp32 layer through the Triton interpreter; on a GPU: a bnb NF4 layer in bf16."""
    import torch._inductor.config as inductor_config

    from fastlora import _backend
    from fastlora.layer import LoraLinear

    if DEV == "cuda":
        bnb = pytest.importorskip("bitsandbytes")
        lin = bnb.nn.Linear4bit(256, 384, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        x = torch.randn(2, 33, 256, device=DEV, dtype=torch.bfloat16)
    else:
        lin = torch.nn.Linear(64, 40, bias=False)
        x = torch.randn(2, 5, 64)
    layer = LoraLinear(lin, r=16 if DEV == "cuda" else 8, lora_alpha=16, dropout=0.1).to(DEV).train()
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    _backend.set_backend("triton")
    torch._dynamo.reset()
    try:
        outs = []
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(layer, fullgraph=True)
            for fn in (layer, compiled):
                layer.zero_grad()
                torch.manual_seed(5)
                y = fn(x)
                y.float().square().mean().backward()
                outs.append((y.float(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    finally:
        _backend.set_backend("auto")
        torch._dynamo.reset()
    for a, b in zip(*outs):
        assert relerr(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
def test_gpu_cuda_graph_capture_of_forward_and_backward(merge):
    """Both merges capture into one CUDA graph (no host sync, no allocation outside the graph pool)
    and replay correctly on new inputs."""
    base, x, A, B = _graph_case()
    w = fused.packed_weight(base)
    x, A, B = x.detach(), A.detach(), B.detach()
    dy = torch.randn(x.shape[0], base.shape[0], device="cuda", dtype=torch.bfloat16)

    def step():
        y, xa = fused.forward_impl(x, w, A, B, 0.5, None, 0.0, 0, merge)
        return (y, *fused.backward_impl(dy, x, w, A, B, xa, 0.5, 0.0, 0))

    side = torch.cuda.Stream()  # warm-up (compilation) outside the capture, on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert relerr(got, want) < 1e-3


@pytest.mark.gpu
def test_gpu_make_graphed_callables_autograd():
    """The autograd op inside torch.cuda.make_graphed_callables (forward and backward graphs)."""
    base, x, A, B = _graph_case()

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = torch.nn.Parameter(A.detach().clone()), torch.nn.Parameter(B.detach().clone())

        def forward(self, x):
            return fused.lora_linear_fused(x, base, self.A, self.B, 0.5)

    eager, layer = Layer(), Layer()
    graphed = torch.cuda.make_graphed_callables(layer, (x.detach().clone().requires_grad_(),))
    xin = torch.randn_like(x).requires_grad_()
    dy = torch.randn(x.shape[0], base.shape[0], device="cuda", dtype=torch.bfloat16)
    y = graphed(xin)
    y.backward(dy)
    xe = xin.detach().clone().requires_grad_()
    ye = eager(xe)
    ye.backward(dy)
    assert relerr(y, ye) < 1e-3 and relerr(xin.grad, xe.grad) < 1e-3
    assert relerr(layer.A.grad, eager.A.grad) < 1e-3 and relerr(layer.B.grad, eager.B.grad) < 1e-3


@pytest.mark.gpu
def test_gpu_layer_autocast_fp32_params_matches_reference():
    """LoraLinear with fp32 A/B under bf16 autocast on a bnb Linear4bit: triton vs torch backends."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastlora import _backend
    from fastlora.layer import LoraLinear

    lin = bnb.nn.Linear4bit(512, 768, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    layer = LoraLinear(lin, r=16, lora_alpha=32).cuda()
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(4, 33, 512, device="cuda")
    outs = {}
    for backend in ("torch", "triton"):
        _backend.set_backend(backend)
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        outs[backend] = (y.float(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    _backend.set_backend("auto")
    assert outs["triton"][0].dtype == outs["torch"][0].dtype
    for a, b in zip(outs["triton"], outs["torch"]):
        assert relerr(a, b) < 1e-2


def test_auto_merge_rule():
    """``auto`` merges small-M forwards by addmm (measured faster at M = 16) and large-M ones by the
    byte rule (cat where [x | s·xa] costs fewer bytes than a second pass over y)."""
    from fastlora.ops.fused import CAT_MIN_M, _fwd_cat

    assert not _fwd_cat(16, 4096, 4096, True, "auto")
    assert not _fwd_cat(CAT_MIN_M - 1, 4096, 4096, True, "auto")
    assert _fwd_cat(4096, 4096, 4096, True, "auto")  # 4096·4096 < 2·4096·4096
    assert _fwd_cat(4096, 14336, 4096, True, "auto")
    assert not _fwd_cat(4096, 4096, 14336, True, "auto")  # K = 14336 > 2·N: addmm
    assert not _fwd_cat(4096, 4096, 4096, False, "auto")  # a dense W0 would be copied
    assert _fwd_cat(16, 4096, 4096, False, "cat") and not _fwd_cat(4096, 4096, 4096, True, "addmm")


@pytest.mark.parametrize("needs_lora", [True, False])
def test_frozen_lora_backward_skips_dA_dB_and_custom_op_passes_opcheck(needs_lora, monkeypatch):
    """With A and B frozen (LoRA-GA's gradient estimation) the backward computes dx only: three
    cuBLAS calls (g, dy·W0 and the LoRA epilogue) instead of five, dx unchanged. Both ops (real, fake,
    autograd through AOT dispatch) pass ``torch.library.opcheck`` with and without the LoRA grads."""
    base = _base(72, 40, "nf4-nested", torch.float32)
    w = fused.packed_weight(base)
    x = torch.randn(6, 40, device=DEV)
    A, B = torch.randn(8, 40, device=DEV) / 8, torch.randn(72, 8, device=DEV)
    dy = torch.randn(6, 72, device=DEV)
    _, xa = fused.forward_impl(x, w, A, B, 0.5, None, 0.0, None)
    calls = []
    real_mm, real_addmm, real_addmm_ = torch.mm, torch.addmm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real_addmm(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: calls.append(1) or real_addmm_(*a, **k))
    dx, da, db = fused.backward_impl(dy, x, w, A, B, xa, 0.5, 0.0, None, True, needs_lora)
    monkeypatch.undo()
    assert len(calls) == (5 if needs_lora else 3)
    assert (da is None and db is None) != needs_lora
    dense = fused._dense(w, torch.float32)
    assert relerr(dx, dy @ dense + 0.5 * (dy @ B) @ A) < 1e-5
    qmeta = [72, 40, base.blocksize, base.blocksize2, 0]
    packed = base.packed.view(torch.uint8).reshape(-1)
    args = (dy, x, packed, base.absmax, base.absmax2, base.code2, base.offset.reshape(1).float(), qmeta,
            A, B, xa, 0.5, 0.0, None, True, needs_lora)  # fmt: skip
    torch.library.opcheck(torch.ops.fastlora.lora_linear_bwd.default, args)
    # the forward op with its autograd formula (which calls the backward op), A and B trainable or not
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(needs_lora), B.clone().requires_grad_(needs_lora)
    fwd_args = (xg, *args[2:8], Ag, Bg, None, 0.5, 0.0, None)
    torch.library.opcheck(torch.ops.fastlora.lora_linear_fwd.default, fwd_args)


@pytest.mark.gpu
def test_gpu_patched_llama_compiles_fullgraph_and_inductor_sees_the_kernels():
    """``torch.compile(fullgraph=True)`` of a patched tiny Llama on 4-bit weights: no graph break, the
    ops are decomposed (the traced forward and backward graphs hold the dequantisation kernel as a
    ``triton_kernel_wrapper`` node and cuBLAS calls, not an opaque ``fastlora.lora_linear_*`` call),
    and the compiled loss and LoRA grads match eager."""
    pytest.importorskip("bitsandbytes")
    from functorch.compile import make_boxed_func
    from helpers import quantize_model_bnb, tiny_llama
    from torch._dynamo.backends.common import aot_autograd

    import fastlora

    model = fastlora.patch(quantize_model_bnb(tiny_llama()).cuda(), r=8, alpha=16).train()
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    ids = torch.randint(0, 96, (2, 16), device="cuda")
    outs = []
    for fn in (
        model,
        torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)),
    ):
        model.zero_grad()
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach().float(), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    torch._dynamo.reset()
    assert len(graphs) == 2 and all("triton_kernel_wrapper" in g for g in graphs)
    assert not any("fastlora.lora_linear" in g for g in graphs)
    assert relerr(outs[0][0], outs[1][0]) < 1e-3
    for a, b in zip(outs[0][1], outs[1][1]):
        assert relerr(a, b) < 2e-2


def test_layer_under_autocast_matches_reference_and_outside_it_needs_no_autocast_context(monkeypatch):
    """Under autocast the op turns it off for its own GEMMs (bf16 in, bf16 out, = the reference);
    outside autocast no ``torch.autocast`` context is built per call (host time)."""
    from fastlora import _backend
    from fastlora.layer import LoraLinear

    layer = LoraLinear(torch.nn.Linear(64, 40).to(DEV), r=8, lora_alpha=16).to(DEV)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 64, device=DEV)
    outs = {}
    try:
        for backend in ("torch", "triton"):
            _backend.set_backend(backend)
            layer.zero_grad()
            with torch.autocast(DEV, dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().mean().backward()
            outs[backend] = (y, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        assert _backend.current() == "triton"
        built = []
        real = torch.autocast
        monkeypatch.setattr(torch, "autocast", lambda *a, **k: built.append(1) or real(*a, **k))
        layer(x).sum().backward()
    finally:
        _backend.set_backend("auto")
    assert outs["triton"][0].dtype == outs["torch"][0].dtype == torch.bfloat16
    for a, b in zip(outs["triton"], outs["torch"]):
        assert relerr(a.float(), b.float()) < 1e-2
    assert not built


# ------------------------------------------------------------------------------------------------
# the CUDA compiler's front end, without a GPU
# ------------------------------------------------------------------------------------------------
_COMPILE_DEQUANT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlora.kernels.dequant import _dequant4_group_kernel, _dequant4_kernel

def signature(kernel, nested, consts):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "out_ptr":
            sig[name] = "*bf16"
        elif name.startswith("q") or (name in ("a0", "a1", "a2", "absmax_ptr") and nested):
            sig[name] = "*u8"
        elif name.endswith("_ptr") or name[0] in "aco":
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig

for kernel, nested, aligned in itertools.product((_dequant4_kernel, _dequant4_group_kernel), (False, True), (False, True)):
    consts = dict(NESTED=nested, EVEN_K=aligned, K_ALIGNED=aligned, QTYPE=0, BS=64, BS2=256, LOOKUP=1,
                  BLOCK_R=64, BLOCK_K=64)
    src = ASTSource(kernel, signature=signature(kernel, nested, consts),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
print("ok")
"""


def test_dequant_kernels_compile_for_hopper():
    """The interpreter runs Python, not Triton's compiler: a kernel it accepts can still be refused on
    the GPU (e.g. a variable rebound to another pointer type). Compile both dequantisation kernels for
    an sm_90 target offline, in a process without TRITON_INTERPRET (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run(
        [sys.executable, "-c", "from triton.backends.nvidia.compiler import CUDABackend"], env=env, capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("Triton's NVIDIA backend is not installed")
    out = subprocess.run([sys.executable, "-c", _COMPILE_DEQUANT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
