"""The fused Triton LoRA linear op: ``torch.library`` custom ops around the kernels in ``fastlora.kernels``.

    y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias)        W0 dense (bf16/fp16/fp32) or bitsandbytes NF4/FP4

Three implementations (``FASTLORA_PATH`` / :func:`set_path` force one; ``auto`` takes ``fused`` for
M <= ``FUSED_MAX_M``, 0 by default -- see the measurements in bench/NOTES.md):

* ``fused`` (meant for small M: decode, eval) -- W0 is read once per output tile, a 4-bit W0
  as packed bytes dequantised in registers; the LoRA term is extra K-steps of the same fp32
  accumulator. Forward = ``lora_down`` (x·Aᵀ, split over K) + ``lora_fwd_fused``; backward =
  ``lora_bwd_aux`` (one pass over dy for g = dy·B and dB, one over x for dA) + ``lora_dx_fused``.
* ``cublas`` (the default) -- the base product goes to cuBLAS.
  A 4-bit W0 is dequantised by ``dequant_4bit`` into a scratch buffer (from torch's caching
  allocator, so the same block is reused call after call) that may also hold the LoRA factor:
  ``y = [x | s·xa | 0]·[W0 | B | 0]ᵀ`` is then a single GEMM whose
  fp32 accumulation contains the LoRA term ("cat" merge; forward only), or -- where the concatenated
  activation would cost more bytes than it saves -- the LoRA term is added by ``lora_up_add``
  ("addmm" merge). Without dropout the LoRA-only products of the backward (g = dy·B, dA, dB) and the
  forward's x·Aᵀ in addmm mode are cuBLAS calls: measured faster than the Triton passes at these sizes.
* ``small`` (the forward at M <= ``SMALL_MAX_M``, 1 by default, on a 4-bit W0; taken by ``auto``)
  -- ``lora_fwd_small``: the packed codes read as 32-bit words and decoded in registers by warp
  shuffles, K split over programs, the LoRA term and bias added by the split-K finalize kernel. No
  dequantised W0 is written. Its backward is the ``cublas`` path's.

Saved for backward: x and xa = drop(x)·Aᵀ only (plus W0's own storage, never a dequantised copy).
Dropout: the keep-mask is Philox ``tl.rand(seed, m·K + k)`` -- regenerated in backward, never stored.
The seed may be a 1-element integer tensor on the GPU (what :class:`fastlora.LoraLinear` draws): the
kernels read it from memory, so dropout costs no host sync and no graph break under torch.compile.
It is a different stream from the reference's ``torch.Generator``, so the masks differ between
backends for the same seed; each backend is self-consistent between forward and backward.
"""

from __future__ import annotations

import os

import torch

from ..kernels import (
    Packed4bit,
    dequant_4bit,
    down_splits,
    interpreting,
    lora_aux,
    lora_bwd_aux,
    lora_down,
    lora_dx_fused,
    lora_fwd_fused,
    lora_fwd_small,
    lora_up_add,
    seed_tensor,
    small_supported,
)
from ..quant import QuantizedWeight

__all__ = ["dropout_keep_mask", "lora_linear_fused", "set_path", "supports"]

_PATHS = ("auto", "fused", "cublas", "small")
_MERGES = ("auto", "cat", "addmm")
_path = os.environ.get("FASTLORA_PATH", "auto")
_merge = os.environ.get("FASTLORA_MERGE", "auto")
# Largest M that takes the fused path under "auto". Measured on an H100 (bench/NOTES.md, CUDA-graph
# forward at M = 16): dequantise + cuBLAS beat the in-register NF4 kernel 2-2.5x and tied or beat the
# dense fused kernel, so "auto" uses the cuBLAS path everywhere; FASTLORA_FUSED_MAX_M re-enables it.
FUSED_MAX_M = int(os.environ.get("FASTLORA_FUSED_MAX_M", "0"))
# Largest M that takes the small-M 4-bit forward kernel under "auto". Measured on an H100 (CUDA-graph
# forward, bench/NOTES.md, v5): at M = 1 it beat dequantise + cuBLAS by 5-13 % at the 14336-wide
# shapes and tied at 4096x4096; at M = 16 it won one shape, tied one and lost one by 14 %; at M = 64 it
# was 1.6-1.7x slower. It never allocates the dequantised W0 (FASTLORA_SMALL_MAX_M=16 trades that
# time for the memory).
SMALL_MAX_M = int(os.environ.get("FASTLORA_SMALL_MAX_M", "1"))


def set_path(path: str = "auto", merge: str = "auto") -> None:
    """Force the implementation: ``path`` in auto|fused|cublas|small, ``merge`` (cuBLAS path) in
    auto|cat|addmm. ``small`` takes the small-M 4-bit forward kernel wherever it applies (any M up to
    its limit), ``cublas`` never does."""
    global _path, _merge
    if path not in _PATHS or merge not in _MERGES:
        raise ValueError(f"fastlora: path must be one of {_PATHS} and merge one of {_MERGES}")
    _path, _merge = path, merge


def _use_fused(m: int) -> bool:
    return _path == "fused" or (_path == "auto" and m <= FUSED_MAX_M)


def _use_small(x: torch.Tensor, w: torch.Tensor | Packed4bit) -> bool:
    """The small-M 4-bit forward (``lora_fwd_small``) for this call? Backward is unaffected."""
    if _path not in ("auto", "small") or not small_supported(x, w):
        return False
    return _path == "small" or x.shape[0] <= SMALL_MAX_M


def _round8(r: int) -> int:
    return (r + 7) // 8 * 8


# Below this M "auto" merges by addmm: at M = 16 (CUDA graphs, H100, bench/NOTES.md) the cat merge's
# GEMM over K + 8 columns ran slower than the plain GEMM plus ``lora_up_add`` (NF4, 4096x4096: 60 vs
# 41 us; 4096x14336: 140 vs 119 us); from M = 4096 up the byte rule below picked the faster one.
CAT_MIN_M = 1024


def _fwd_cat(m: int, n: int, k: int, quant: bool) -> bool:
    """Merge the forward's LoRA term by concatenation? Bytes of [x | s·xa] (plus a copy of a dense
    W0) against an extra read+write of y; never for small M (see ``CAT_MIN_M``)."""
    if _merge != "auto":
        return _merge == "cat"
    return m >= CAT_MIN_M and m * k + (0 if quant else 2 * n * k) < 2 * m * n


def supports(x, base, lora_A, lora_B, bias=None, dropout_p=0.0) -> bool:
    """Whether :func:`lora_linear_fused` handles these inputs (else the caller uses the reference).

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; bf16/fp16/fp32 activations with A, B
    (and a dense W0, bias) of the same dtype; W0 dense 2-D or a 4-bit NF4/FP4 weight.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return False
    if x.dim() < 1 or x.shape[-1] == 0 or x.numel() == 0:
        return False
    tensors = [lora_A, lora_B] + ([bias] if bias is not None else [])
    if isinstance(base, QuantizedWeight):
        if base.quant_type not in ("nf4", "fp4") or base.blocksize & (base.blocksize - 1):
            return False
        if base.nested and base.blocksize2 & (base.blocksize2 - 1):
            return False
        tensors += [base.packed, base.absmax]
        n, k = base.shape
        if n * k >= 2**31:
            return False
    elif isinstance(base, torch.Tensor) and base.dim() == 2:
        if base.dtype != x.dtype:
            return False
        tensors.append(base)
        n, k = base.shape
    else:
        return False
    if any(t.device != x.device for t in tensors):
        return False
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    r = lora_A.shape[0]
    return k == x.shape[-1] and lora_A.dim() == 2 and lora_A.shape[1] == k and lora_B.shape == (n, r) and 1 <= r <= 256


# ------------------------------------------------------------------------------------------------
# implementation (plain functions on 2-D tensors)
# ------------------------------------------------------------------------------------------------
def _weight(w, absmax, absmax2, code2, offset, qmeta) -> torch.Tensor | Packed4bit:
    n, k, bs, bs2, qtype = qmeta
    if absmax is None:
        return w
    return Packed4bit(w, absmax, ("nf4", "fp4")[qtype], (n, k), bs, absmax2, code2, bs2, offset)


def _weight_of(base: torch.Tensor | QuantizedWeight) -> torch.Tensor | Packed4bit:
    """The kernels' view of W0: the dense tensor itself, or a :class:`Packed4bit` of a 4-bit weight."""
    if not isinstance(base, QuantizedWeight):
        return base
    packed = base.packed if base.packed.dtype == torch.uint8 else base.packed.view(torch.uint8)
    offset = base.offset.reshape(1).float() if base.nested else None
    return Packed4bit(packed.reshape(-1), base.absmax, base.quant_type, tuple(base.shape), base.blocksize,
                      base.absmax2, base.code2, base.blocksize2, offset)  # fmt: skip


def _dense_into(w: torch.Tensor | Packed4bit, out: torch.Tensor) -> None:
    """W0 into the first ``K`` columns and ``N`` rows of ``out``."""
    n, k = w.shape if isinstance(w, Packed4bit) else tuple(w.shape)
    if isinstance(w, Packed4bit):
        dequant_4bit(
            w.packed, w.absmax, w.quant_type, w.shape, w.blocksize, out.dtype,
            absmax2=w.absmax2, code2=w.code2, blocksize2=w.blocksize2, offset=w.offset, out=out,
        )  # fmt: skip
    else:
        out[:n, :k].copy_(w)


def _dense(w: torch.Tensor | Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, Packed4bit):
        return dequant_4bit(
            w.packed, w.absmax, w.quant_type, w.shape, w.blocksize, dtype,
            absmax2=w.absmax2, code2=w.code2, blocksize2=w.blocksize2, offset=w.offset,
        )  # fmt: skip
    return w


def dropout_keep_mask(m: int, k: int, p: float, seed: torch.Tensor | int, device: torch.device | str) -> torch.Tensor:
    """The bool ``[m, k]`` keep-mask this backend applies to 2-D ``x [m, k]`` for ``(p, seed)``
    (an int and an int tensor of the same low 31 bits give the same mask)."""
    return lora_aux.dropout_keep_mask(m, k, p, seed, device)


def _x_down(x, lora_A, dropout_p, seed) -> torch.Tensor:
    """``xa = drop(x)·Aᵀ`` in x's dtype: ``lora_down`` under dropout (it applies the mask), else cuBLAS
    (it reads x at full bandwidth: measured 2.5x faster than ``lora_down`` at M = 4096)."""
    if dropout_p > 0.0:
        return lora_down(x, lora_A, dropout_p=dropout_p, seed=seed)[0]
    return torch.mm(x, lora_A.t())


def forward_impl(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """``(y, xa)`` for 2-D ``x``; ``w`` dense or :class:`Packed4bit`."""
    m, k = x.shape
    r = lora_A.shape[0]
    n = w.shape[0]
    quant = isinstance(w, Packed4bit)
    if _use_fused(m):
        splits = down_splits(m, k)
        part, _ = lora_down(x, lora_A, dropout_p=dropout_p, seed=seed, splits=splits)
        if part.dim() == 2:  # not split: part is xa
            return lora_fwd_fused(x, w, lora_B, scaling, part, bias), part
        xa = torch.empty((m, r), dtype=x.dtype, device=x.device)
        y = lora_fwd_fused(x, w, lora_B, scaling, part, bias, xa_splits=part.shape[0], xa_out=xa)
        return y, xa
    if quant and _use_small(x, w):
        xa = _x_down(x, lora_A, dropout_p, seed)
        return lora_fwd_small(x, w, lora_B, scaling, xa, bias), xa
    if _fwd_cat(m, n, k, quant):
        rp = _round8(r)
        xa, xcat = lora_down(x, lora_A, dropout_p=dropout_p, seed=seed, cat_width=rp, scaling=scaling)
        wcat = torch.empty((n, k + rp), dtype=x.dtype, device=x.device)  # [W0 | B | 0]
        _dense_into(w, wcat)
        wcat[:, k : k + r].copy_(lora_B)
        if rp > r:
            wcat[:, k + r :].zero_()
        y = torch.addmm(bias, xcat, wcat.t()) if bias is not None else torch.mm(xcat, wcat.t())
        return y, xa
    xa = _x_down(x, lora_A, dropout_p, seed)
    w0 = _dense(w, x.dtype)
    y = torch.addmm(bias, x, w0.t()) if bias is not None else torch.mm(x, w0.t())
    lora_up_add(y, xa, lora_B.t(), scaling)
    return y, xa


def backward_impl(dy, x, w, lora_A, lora_B, xa, scaling, dropout_p, seed, needs_dx=True, needs_lora=True):
    """``(dx or None, dA or None, dB or None)`` for 2-D ``dy``/``x``.

    cuBLAS path without dropout: g = dy·B, dB = s·dyᵀ·xa and dA = s·gᵀ·x are three cuBLAS calls (on an
    H100 they ran 4-6x faster than the single-pass ``lora_bwd_aux`` kernel at M >= 4096, whose
    per-row-tile programs leave too few blocks in flight and add with atomics); then
    dx = dy·W0 (cuBLAS on the dequantised scratch) += s·g·A (``lora_up_add``). With frozen A and B
    (``needs_lora=False``: LoRA-GA's gradient estimation, which only needs dx) dA and dB are not
    computed on this path -- two GEMMs fewer, each a pass over x or dy.
    """
    m = dy.shape[0]
    fused_path = _use_fused(m)
    if not (needs_dx or needs_lora):
        return None, None, None
    if dropout_p > 0.0 or fused_path:
        g, _, da, db = lora_bwd_aux(dy, x, xa, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)
    else:
        g = torch.mm(dy, lora_B)
        da = db = None
        if needs_lora:
            db = torch.mm(dy.t(), xa).mul_(scaling)
            da = torch.mm(g.t(), x).mul_(scaling)
    if not needs_lora:
        da = db = None
    if not needs_dx:
        return None, da, db
    if fused_path:
        return lora_dx_fused(dy, w, lora_A, scaling, g, dropout_p=dropout_p, seed=seed), da, db
    dx = torch.mm(dy, _dense(w, dy.dtype))
    lora_up_add(dx, g, lora_A, scaling, dropout_p=dropout_p, seed=seed)
    return dx, da, db


# ------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile: no graph breaks; no host syncs inside)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    w: torch.Tensor,
    absmax: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    qmeta: list[int],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _weight(w, absmax, absmax2, code2, offset, qmeta)
    with torch.autocast(x.device.type, enabled=False):
        return forward_impl(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


@_fwd_op.register_fake
def _(x, w, absmax, absmax2, code2, offset, qmeta, lora_A, lora_B, bias, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, qmeta[0])), x.new_empty((m, lora_A.shape[0]))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    absmax: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    qmeta: list[int],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    needs_dx: bool,
    needs_lora: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _weight(w, absmax, absmax2, code2, offset, qmeta)
    with torch.autocast(dy.device.type, enabled=False):
        dx, da, db = backward_impl(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, needs_dx, needs_lora)
    # A custom op returns tensors (none aliasing another): an empty one stands for "not computed".
    return tuple(dy.new_empty((0,)) if t is None else t for t in (dx, da, db))


@_bwd_op.register_fake
def _(
    dy, x, w, absmax, absmax2, code2, offset, qmeta, lora_A, lora_B, xa, scaling, dropout_p, seed, needs_dx, needs_lora
):
    dx = dy.new_empty((dy.shape[0], qmeta[1]) if needs_dx else (0,))
    if not needs_lora:
        return dx, dy.new_empty((0,)), dy.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, w, absmax, absmax2, code2, offset, qmeta, lora_A, lora_B, _bias, scaling, dropout_p, seed = inputs
    _, xa = output
    ctx.save_for_backward(x, w, absmax, absmax2, code2, offset, lora_A, lora_B, xa, seed)
    ctx.qmeta, ctx.scaling, ctx.dropout_p = list(qmeta), scaling, dropout_p


def _backward(ctx, dy, dxa):
    x, w, absmax, absmax2, code2, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, da, db = torch.ops.fastlora.lora_linear_bwd(
        dy, x, w, absmax, absmax2, code2, offset, ctx.qmeta, lora_A, lora_B, xa,
        ctx.scaling, ctx.dropout_p, seed, bool(needs[0]), bool(needs[7] or needs[8]),
    )  # fmt: skip
    dbias = dy.sum(0) if needs[9] else None
    return (
        dx if needs[0] else None, None, None, None, None, None, None,
        da if needs[7] else None, db if needs[8] else None, dbias, None, None, None,
    )  # fmt: skip


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LoraLinearFused(torch.autograd.Function):
    """Eager twin of the custom ops (same implementation, less Python dispatch per call)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
        with torch.autocast(x.device.type, enabled=False):
            y, xa = forward_impl(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.weight, ctx.scaling, ctx.dropout_p, ctx.seed = weight, scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(dy.device.type, enabled=False):
            dx, da, db = backward_impl(
                dy, x, ctx.weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, ctx.seed,
                bool(needs[0]), bool(needs[2] or needs[3]),
            )  # fmt: skip
        dbias = dy.sum(0) if needs[4] else None
        return dx, None, da if needs[2] else None, db if needs[3] else None, dbias, None, None, None


def lora_linear_fused(
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """``x·W0ᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ (+ bias)`` through the Triton kernels, with autograd.

    Same contract as :func:`fastlora.ops.reference.lora_linear_reference` (check :func:`supports`
    first); the dropout mask is drawn by Philox from ``seed``, an int or a 1-element integer tensor
    on x's device (read by the kernels, never by the host; see the module docstring). Under
    ``torch.compile`` this calls the ``fastlora::lora_linear_fwd``/``_bwd`` custom ops (no graph
    break); eagerly, an ``autograd.Function`` around the same implementation.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n = base.shape[0]
    # One seed tensor per call (an int seed becomes one; a tensor seed is used in place), or none.
    seed = seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    if isinstance(base, QuantizedWeight):
        packed = base.packed if base.packed.dtype == torch.uint8 else base.packed.view(torch.uint8)
        offset = base.offset.reshape(1).float() if base.nested else None
        qtype = 0 if base.quant_type == "nf4" else 1
        if not torch.compiler.is_compiling():
            weight = _weight_of(base)
            y = _LoraLinearFused.apply(x2, weight, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed)
            return y.reshape(*x.shape[:-1], n)
        qmeta = [n, k, base.blocksize, base.blocksize2, qtype]
        wt = (packed.reshape(-1), base.absmax, base.absmax2, base.code2, offset)
    else:
        if not torch.compiler.is_compiling():
            y = _LoraLinearFused.apply(x2, base, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed)
            return y.reshape(*x.shape[:-1], n)
        qmeta = [n, k, 0, 0, 0]
        wt = (base, None, None, None, None)
    y, _ = torch.ops.fastlora.lora_linear_fwd(
        x2, *wt, qmeta, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed
    )
    return y.reshape(*x.shape[:-1], n)
