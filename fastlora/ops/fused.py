"""The Triton + cuBLAS LoRA linear op: ``torch.library.triton_op`` ops around ``fastlora.kernels``.

    y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias)        W0 dense (bf16/fp16/fp32) or bitsandbytes NF4/FP4

The base products go to cuBLAS. A 4-bit W0 is dequantised by ``dequant_4bit`` into a scratch buffer
(from torch's caching allocator, so the same block is reused call after call) that may also hold the
LoRA factor: ``y = [x | s·xa | 0]·[W0 | B | 0]ᵀ`` is then a single GEMM whose fp32 accumulation
contains the LoRA term ("cat" merge, forward only, M >= ``CAT_MIN_M``); otherwise the LoRA term is a
cuBLAS epilogue, ``y.addmm_(xa, Bᵀ, alpha=s)`` ("addmm" merge). Without dropout every LoRA product
is a cuBLAS call: ``xa = x·Aᵀ``, ``g = dy·B``, ``dB = s·dyᵀ·xa``, ``dA = s·gᵀ·x`` (the scale as the
GEMM's alpha) and ``dx = dy·W0 + s·g·A`` (two GEMMs, the second accumulating into the first). With
dropout the passes that need the keep-mask are Triton kernels (``lora_down``, ``lora_bwd_aux``,
``lora_up_add``).

Saved for backward: x and xa = drop(x)·Aᵀ only (plus W0's own storage, never a dequantised copy).
Dropout: the keep-mask is Philox ``tl.rand(seed, m·K + k)`` -- regenerated in backward, never stored.
The seed may be a 1-element integer tensor on the GPU (what :class:`fastlora.LoraLinear` draws): the
kernels read it from memory, so dropout costs no host sync and no graph break under torch.compile.
It is a different stream from the reference's, so the masks differ between backends for the same
seed; each backend is self-consistent between forward and backward.

Eagerly the op is an ``autograd.Function`` calling the implementation directly (the least host time
per call: no dispatcher, no autotuner, fixed launch configs). Under ``torch.compile`` it is the
``fastlora::lora_linear_fwd``/``_bwd`` ``triton_op`` pair: Inductor traces into them, sees the cuBLAS
calls and the Triton kernels (launched through ``torch.library.wrap_triton``) and schedules and
launches them itself, so a compiled step can be CUDA-graphed (``mode="reduce-overhead"``).
"""

from __future__ import annotations

import torch

from ..kernels import Packed4bit, dequant_packed, interpreting, lora_bwd_aux, lora_down, lora_up_add, seed_tensor
from ..quant import QuantizedWeight, packed_bytes
from .reference import autocast_off, scaled_mm

__all__ = ["MERGES", "backward_impl", "forward_impl", "lora_linear_fused", "packed_weight", "supports"]

MERGES = ("auto", "cat", "addmm")

# Below this M "auto" merges by addmm: at M = 16 (CUDA graphs, H100, bench/NOTES.md) the cat merge's
# GEMM over K + 8 columns ran slower than the plain GEMM plus a separate LoRA update (NF4,
# 4096x4096: 60 vs 41 us; 4096x14336: 140 vs 119 us); from M = 4096 up the byte rule below picked
# the faster one.
CAT_MIN_M = 1024


def _round8(r: int) -> int:
    return (r + 7) // 8 * 8


def _fwd_cat(m: int, n: int, k: int, quant: bool, merge: str) -> bool:
    """Merge the forward's LoRA term by concatenation? Bytes of [x | s·xa] (plus a copy of a dense
    W0) against an extra read+write of y; never for small M (see ``CAT_MIN_M``)."""
    if merge != "auto":
        if merge not in MERGES:
            raise ValueError(f"fastlora: merge must be one of {', '.join(MERGES)}, got {merge!r}")
        return merge == "cat"
    return m >= CAT_MIN_M and m * k + (0 if quant else 2 * n * k) < 2 * m * n


def supports(x, base, lora_A, lora_B, bias=None, dropout_p=0.0) -> bool:
    """Whether :func:`lora_linear_fused` handles these inputs (else the caller uses the reference).

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; bf16/fp16/fp32 activations with a dense
    W0 and bias of the same dtype (A and B may be any float dtype: they are cast to x's); W0 dense 2-D
    or a 4-bit NF4/FP4 weight.
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
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()) or (bias is not None and bias.dtype != x.dtype):
        return False
    r = lora_A.shape[0]
    return k == x.shape[-1] and lora_A.dim() == 2 and lora_A.shape[1] == k and lora_B.shape == (n, r) and 1 <= r <= 256


# ------------------------------------------------------------------------------------------------
# implementation (plain functions on 2-D tensors; the same code runs eagerly and traced)
# ------------------------------------------------------------------------------------------------
def _weight(w, absmax, absmax2, code2, offset, qmeta) -> torch.Tensor | Packed4bit:
    n, k, bs, bs2, qtype = qmeta
    if absmax is None:
        return w
    return Packed4bit(w, absmax, ("nf4", "fp4")[qtype], (n, k), bs, absmax2, code2, bs2, offset)


def packed_weight(base: QuantizedWeight) -> Packed4bit:
    """The kernels' view of a 4-bit W0 (its bytes as flat uint8, whatever the storage dtype)."""
    offset = base.offset.reshape(1).float() if base.nested else None
    return Packed4bit(packed_bytes(base.packed), base.absmax, base.quant_type, tuple(base.shape), base.blocksize,
                      base.absmax2, base.code2, base.blocksize2, offset)  # fmt: skip


def _dense(w: torch.Tensor | Packed4bit, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W0 as a dense matrix (dequantised into ``out``'s first K columns when given)."""
    if isinstance(w, Packed4bit):
        return dequant_packed(w, dtype, out)
    if out is not None:
        out[:, : w.shape[1]].copy_(w)
        return out
    return w


def forward_impl(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed, merge="auto"):
    """``(y, xa)`` for 2-D ``x``; ``w`` dense or :class:`Packed4bit`."""
    m, k = x.shape
    r = lora_A.shape[0]
    n = w.shape[0]
    if _fwd_cat(m, n, k, isinstance(w, Packed4bit), merge):
        rp = _round8(r)
        xa, xcat = lora_down(x, lora_A, dropout_p=dropout_p, seed=seed, cat_width=rp, scaling=scaling)
        wcat = _dense(w, x.dtype, torch.empty((n, k + rp), dtype=x.dtype, device=x.device))  # [W0 | B | 0]
        wcat[:, k : k + r].copy_(lora_B)
        if rp > r:
            wcat[:, k + r :].zero_()
        y = torch.addmm(bias, xcat, wcat.t()) if bias is not None else torch.mm(xcat, wcat.t())
        return y, xa
    # Without dropout cuBLAS, which reads x at full bandwidth: measured 2.5x faster than lora_down at M = 4096.
    xa = lora_down(x, lora_A, dropout_p=dropout_p, seed=seed)[0] if dropout_p > 0.0 else torch.mm(x, lora_A.t())
    w0 = _dense(w, x.dtype)
    y = torch.addmm(bias, x, w0.t()) if bias is not None else torch.mm(x, w0.t())
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def backward_impl(
    dy, x, w, lora_A, lora_B, xa, scaling, dropout_p, seed, needs_dx=True, needs_lora=True, grad_dtype=None
):
    """``(dx or None, dA or None, dB or None)`` for 2-D ``dy``/``x``; dA and dB in ``grad_dtype`` (the
    parameters' dtype; default: dy's) where the GEMMs write them (no dropout).

    Without dropout: g = dy·B, dB = s·dyᵀ·xa and dA = s·gᵀ·x are three cuBLAS calls (on an H100 they
    ran 4-6x faster than the single-pass ``lora_bwd_aux`` kernel at M >= 4096, whose per-row-tile
    programs leave too few blocks in flight and add with atomics); then dx = dy·W0 (cuBLAS on the
    dequantised scratch) += s·g·A (a cuBLAS epilogue; under dropout ``lora_up_add`` applies the mask).
    With frozen A and B (``needs_lora=False``: LoRA-GA's gradient estimation, which only needs dx)
    dA and dB are not computed -- two GEMMs fewer, each a pass over x or dy.
    """
    if not (needs_dx or needs_lora):
        return None, None, None
    da = db = None
    if dropout_p > 0.0:
        g, da, db = lora_bwd_aux(dy, x, xa, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)
        if not needs_lora:
            da = db = None
    else:
        g = torch.mm(dy, lora_B)
        if needs_lora:
            db = scaled_mm(dy.t(), xa, scaling, grad_dtype)
            da = scaled_mm(g.t(), x, scaling, grad_dtype)
    if not needs_dx:
        return None, da, db
    dx = torch.mm(dy, _dense(w, dy.dtype))
    if dropout_p > 0.0:
        lora_up_add(dx, g, lora_A, scaling, dropout_p=dropout_p, seed=seed)
    else:
        dx.addmm_(g, lora_A, alpha=scaling)
    return dx, da, db


# ------------------------------------------------------------------------------------------------
# torch.library triton ops: what torch.compile sees (Inductor traces into them; no graph break)
# ------------------------------------------------------------------------------------------------
def _fwd_body(
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
    # Traced, the "cat" merge's in-place writes into slices of the [W0 | B] buffer (dequantisation, B,
    # the zero tail) are functionalised, which can cost whole-buffer copies; the addmm merge writes
    # only fresh buffers. Compiled 3B step on an H200 (bench/NOTES.md): 0.294 s with the cat merge,
    # 0.164 s with addmm.
    with torch.autocast(x.device.type, enabled=False):
        return forward_impl(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, "addmm")


def _fwd_fake(x, w, absmax, absmax2, code2, offset, qmeta, lora_A, lora_B, bias, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, qmeta[0])), x.new_empty((m, lora_A.shape[0]))


def _bwd_body(
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
    # An op returns tensors (none aliasing another): an empty one stands for "not computed".
    return tuple(dy.new_empty((0,)) if t is None else t for t in (dx, da, db))


def _bwd_fake(
    dy, x, w, absmax, absmax2, code2, offset, qmeta, lora_A, lora_B, xa, scaling, dropout_p, seed, needs_dx, needs_lora
):
    dx = dy.new_empty((dy.shape[0], qmeta[1]) if needs_dx else (0,))
    if not needs_lora:
        return dx, dy.new_empty((0,)), dy.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _register(name: str, body, fake):
    """A ``triton_op`` (its body is its own fake kernel: traced with fake tensors, the launches go
    through ``wrap_triton``). Under the Triton interpreter an opaque custom op with an explicit fake
    kernel instead: interpreted kernels cannot be traced."""
    if interpreting():
        op = torch.library.custom_op(name, body, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, body, mutates_args=())


_fwd_op = _register("fastlora::lora_linear_fwd", _fwd_body, _fwd_fake)
_bwd_op = _register("fastlora::lora_linear_bwd", _bwd_body, _bwd_fake)


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
    """Eager twin of the ops (same implementation, no dispatcher on the way). It takes x of any rank
    and A, B in any float dtype and does the reshapes and casts itself: no view or cast nodes in the
    autograd graph; dA and dB come back in the parameters' dtype (written so by their GEMMs where
    :func:`~fastlora.ops.reference.scaled_mm` can, else cast by the engine)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, merge):
        x_shape = x.shape
        x2 = x.reshape(-1, x_shape[-1])
        ctx.grad_dtype = lora_A.dtype
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        with autocast_off(x.device.type):
            y, xa = forward_impl(x2, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, merge)
        ctx.save_for_backward(x2, lora_A, lora_B, xa)
        ctx.weight, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape = weight, scaling, dropout_p, seed, x_shape
        return y.view(*x_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(dy.device.type):
            dx, da, db = backward_impl(
                dy.reshape(-1, dy.shape[-1]), x, ctx.weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p,
                ctx.seed, needs[0], needs[2] or needs[3], ctx.grad_dtype,
            )  # fmt: skip
        dx = dx.view(ctx.x_shape) if dx is not None else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if needs[4] else None
        return dx, None, da if needs[2] else None, db if needs[3] else None, dbias, None, None, None, None


def lora_linear_fused(
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
    merge: str = "auto",
) -> torch.Tensor:
    """``x·W0ᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ (+ bias)`` through cuBLAS and the Triton kernels, with autograd.

    Same contract as :func:`fastlora.ops.reference.lora_linear_reference` (check :func:`supports`
    first); the dropout mask is drawn by Philox from ``seed``, an int or a 1-element integer tensor
    on x's device (read by the kernels, never by the host; see the module docstring). Under
    ``torch.compile`` this calls the ``fastlora::lora_linear_fwd``/``_bwd`` triton ops (no graph
    break); eagerly, an ``autograd.Function`` around the same implementation. ``merge`` forces how
    the eager forward adds the LoRA term (one of :data:`MERGES`; for the benchmark and the tests).
    """
    # One seed tensor per call (an int seed becomes one; a tensor seed is used in place), or none.
    seed = seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    quant = isinstance(base, QuantizedWeight)
    if not torch.compiler.is_compiling():
        weight = packed_weight(base) if quant else base
        return _LoraLinearFused.apply(x, weight, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed, merge)
    k = x.shape[-1]
    n = base.shape[0]
    if quant:
        w = packed_weight(base)
        qmeta = [n, k, w.blocksize, w.blocksize2, 0 if w.quant_type == "nf4" else 1]
        wt = (w.packed, w.absmax, w.absmax2, w.code2, w.offset)
    else:
        qmeta = [n, k, 0, 0, 0]
        wt = (base, None, None, None, None)
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    y, _ = torch.ops.fastlora.lora_linear_fwd(
        x.reshape(-1, k), *wt, qmeta, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed
    )
    return y.reshape(*x.shape[:-1], n)
