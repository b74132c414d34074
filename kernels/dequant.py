"""4-bit (NF4 / FP4) dequantisation straight from bitsandbytes storage, bit-identical to
``bitsandbytes.functional.dequantize_4bit``.

Storage: ``W[N, K]`` flattened row-major, two 4-bit codes per byte, the first element of each pair
in the high nibble; one fp32 ``absmax`` per ``blocksize`` flat elements, or (double quantisation)
uint8 codes into the 256-entry ``code2`` map with fp32 ``absmax2`` per ``blocksize2`` blocks and a
scalar ``offset``. Value = ``code[q] · scale`` in fp32, rounded once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    QTYPES,
    Packed4bit,
    block_scale,
    cast,
    code_lookup,
    interpreting,
    launcher,
    log2_exact,
    lookup_code,
)

__all__ = ["dequant_4bit", "dequant_group", "dequant_packed", "groupable"]

# One tile config, measured on an H100/H200 (bench/bench_lookup.py): no autotuner on the launch path,
# and a kernel Inductor can launch as is (see ``fastlora.ops.fused``).
_BLOCK_R, _BLOCK_K, _WARPS = 64, 64, 4
_INTERP_BLOCK_R, _INTERP_BLOCK_K = 32, 64  # small tiles keep the interpreter fast on test shapes


@triton.jit
def _dequant4_tile(
    q_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    stride_on,
    N,
    K,
    pid_n,
    pid_k,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[n, k] = code[q] * scale`` for the ``[BLOCK_R, BLOCK_K]`` tile ``(pid_n, pid_k)``, in fp32
    rounded once to out's dtype. With K even each byte is loaded once and its two nibbles interleaved
    (``tl.join``); when the tile's rows lie inside single scale blocks (``K_ALIGNED``: ``K % BS == 0``;
    ``BLOCK_K <= BS``) one scale per row is loaded, else one per element."""
    OUT = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    k0 = pid_k * BLOCK_K
    row_scale: tl.constexpr = K_ALIGNED and BLOCK_K <= BS
    if EVEN_K:
        offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BH] byte column inside a row
        mask = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)  # [BR, BH]
        byte = offs_n[:, None].to(tl.int64) * (K // 2) + offs_p[None, :]  # [BR, BH]
        b = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        if row_scale:
            blk = (offs_n.to(tl.int64) * K + k0) // BS  # [BR]
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, offs_n < N, BS2, NESTED)[:, None]
        else:
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (byte * 2) // BS, mask, BS2, NESTED)
        hi = cast(code_lookup(b >> 4, QTYPE, LOOKUP) * scale, OUT)  # [BR, BH] even columns
        lo = cast(code_lookup(b & 15, QTYPE, LOOKUP) * scale, OUT)  # [BR, BH] odd columns
        w = tl.join(hi, lo).reshape(BLOCK_R, BLOCK_K)  # [BR, BK]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        flat = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # [BR, BK]
        b = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nib = (b >> (((flat + 1) & 1) * 4).to(tl.int32)) & 15
        if row_scale:
            blk = (offs_n.to(tl.int64) * K + k0) // BS  # [BR]
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, offs_n < N, BS2, NESTED)[:, None]
        else:
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BS, mask, BS2, NESTED)
        w = cast(code_lookup(nib, QTYPE, LOOKUP) * scale, OUT)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w, mask=mask)


@triton.jit
def _dequant4_kernel(
    q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, stride_on, N, K,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, QTYPE: tl.constexpr, BS: tl.constexpr,
    BS2: tl.constexpr, LOOKUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One weight: program ``(i, j)`` writes tile ``(i, j)``."""
    _dequant4_tile(
        q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, stride_on, N, K,
        tl.program_id(0), tl.program_id(1), NESTED, EVEN_K, K_ALIGNED, QTYPE, BS, BS2, LOOKUP, BLOCK_R, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _dequant4_group_kernel(
    q0, a0, a20, c20, o0, q1, a1, a21, c21, o1, q2, a2, a22, c22, o2,
    out_ptr, stride_on, N0, N1, N2, T0, T1, K,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, QTYPE: tl.constexpr, BS: tl.constexpr,
    BS2: tl.constexpr, LOOKUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Up to three weights of one K stacked row-wise in ``out`` (rows ``[0, N0)``, ``[N0, N0+N1)``, …)
    in one launch: row tiles ``[0, T0)`` belong to weight 0, ``[T0, T0+T1)`` to weight 1, the rest to 2."""
    pid = tl.program_id(0)
    first, second = pid < T0, pid < T0 + T1
    n = tl.where(first, N0, tl.where(second, N1, N2))
    row0 = tl.where(first, 0, tl.where(second, N0, N0 + N1))
    pid_n = tl.where(first, pid, tl.where(second, pid - T0, pid - T0 - T1))
    # (fresh names: a2 is weight 2's absmax)
    if first:
        q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr = q0, a0, a20, c20, o0
    elif second:
        q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr = q1, a1, a21, c21, o1
    else:
        q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr = q2, a2, a22, c22, o2
    _dequant4_tile(
        q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr + row0.to(tl.int64) * stride_on, stride_on, n, K,
        pid_n, tl.program_id(1), NESTED, EVEN_K, K_ALIGNED, QTYPE, BS, BS2, LOOKUP, BLOCK_R, BLOCK_K,
    )  # fmt: skip


def dequant_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = 256,
    offset: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lookup: str = "gather",
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Dequantise bitsandbytes 4-bit storage into a dense ``[N, K]`` matrix.

    Args:
        packed: the packed bytes (any dtype view of them; ``ceil(N*K/2)`` bytes).
        absmax: fp32 per-block scales, or uint8 codes into ``code2`` when double-quantised.
        quant_type: "nf4" or "fp4" (bitsandbytes' value tables are built into the kernel).
        shape: ``(N, K)``.
        blocksize: elements per scale (a power of two).
        dtype: output dtype (bf16, fp16 or fp32).
        absmax2, code2, blocksize2, offset: double-quantisation state (``absmax2`` None = not nested);
            ``offset`` is a 0-d/1-element fp32 tensor, read on the device (no host sync).
        out: optional destination whose first ``K`` columns receive W0 (its row stride may exceed
            ``K``, e.g. a ``[N, K + r]`` buffer whose tail holds other data; columns ``>= K`` are untouched).
        lookup: how a code becomes its value (a key of ``NF4_LOOKUPS``; all bit-identical, "gather"
            measured fastest). block: ``(BLOCK_R, BLOCK_K, num_warps)`` instead of the measured
            default -- both for the benchmark.
    """
    n, k = shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    assert out.dtype == dtype and out.shape[0] >= n and out.shape[1] >= k and out.stride(1) == 1
    block = block or _default_block()
    consts = _constexprs(quant_type, k, blocksize, absmax2 is not None, blocksize2, lookup, block)
    launcher(_dequant4_kernel, packed)[(triton.cdiv(n, block[0]), triton.cdiv(k, block[1]))](
        *_pointers(packed, absmax, absmax2, code2, offset), out, out.stride(0), n, k, **consts
    )
    return out


def _default_block() -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_K, num_warps)``: the measured config, or small tiles under the interpreter."""
    return (_INTERP_BLOCK_R, _INTERP_BLOCK_K, 4) if interpreting() else (_BLOCK_R, _BLOCK_K, _WARPS)


def _pointers(packed, absmax, absmax2, code2, offset) -> tuple[torch.Tensor, ...]:
    """The five tensors the kernels read for one weight (the nested slots repeat absmax when it is
    not double-quantised; the packed bytes as flat uint8, whatever their storage dtype)."""
    # Each reshape or view is skipped where the tensor already has its form: these run per launch.
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    packed = packed if packed.dim() == 1 else packed.reshape(-1)
    absmax = absmax if absmax.dim() == 1 else absmax.reshape(-1)
    if absmax2 is None:
        return (packed, absmax, absmax, absmax, absmax)
    return (packed, absmax, absmax2, code2, offset if offset.dim() == 1 else offset.reshape(1))


def _constexprs(quant_type: str, k: int, blocksize: int, nested: bool, blocksize2: int, lookup: str, block) -> dict:
    """The compile-time arguments both dequantisation kernels take (block sizes checked here)."""
    log2_exact(blocksize)
    if nested:
        log2_exact(blocksize2)
    br, bk, warps = block
    return dict(
        NESTED=nested, EVEN_K=k % 2 == 0, K_ALIGNED=k % blocksize == 0, QTYPE=QTYPES[quant_type], BS=blocksize,
        BS2=blocksize2 if nested else 256, LOOKUP=lookup_code(lookup), BLOCK_R=br, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip


def groupable(weights: Sequence[Packed4bit]) -> bool:
    """Whether :func:`dequant_group` takes these weights: 1 to 3 of one K and one quantisation."""
    keys = {(w.quant_type, w.blocksize, w.nested, w.blocksize2 if w.nested else 0, w.shape[1]) for w in weights}
    return 1 <= len(weights) <= 3 and len(keys) == 1


def dequant_group(weights: Sequence[Packed4bit], dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Dequantise up to three 4-bit weights of one width K, stacked row-wise into ``out`` (``[ΣN_i, ≥K]``,
    unit column stride; columns ``>= K`` untouched), in one kernel launch -- what a group of
    projections reading one input (q/k/v, gate/up) needs, at a third of the launches of one call per
    weight. The weights must share their quantisation (type, block sizes, nesting); values are
    bit-identical to :func:`dequant_4bit` of each."""
    if not groupable(weights):
        raise ValueError(
            f"fastlora.kernels: dequant_group takes 1 to 3 weights of one K and one quantisation, got "
            f"{[(w.shape, w.quant_type, w.blocksize, w.nested) for w in weights]}"
        )
    w0 = weights[0]
    k = w0.shape[1]
    ns = [w.shape[0] for w in weights]
    assert out.dtype == dtype and out.shape[0] >= sum(ns) and out.shape[1] >= k and out.stride(1) == 1
    block = _default_block()
    consts = _constexprs(w0.quant_type, k, w0.blocksize, w0.nested, w0.blocksize2, "gather", block)
    tiles = [triton.cdiv(n, block[0]) for n in ns]
    ptrs = [_pointers(w.packed, w.absmax, w.absmax2, w.code2, w.offset) for w in weights]
    ptrs += [ptrs[0]] * (3 - len(ptrs))  # unused slots: never reached (no tiles)
    ns += [0] * (3 - len(ns))
    tiles += [0] * (3 - len(tiles))
    _dequant4_group_kernel[(sum(tiles), triton.cdiv(k, block[1]))](
        *ptrs[0], *ptrs[1], *ptrs[2], out, out.stride(0), *ns, tiles[0], tiles[1], k, **consts
    )
    return out


def dequant_packed(w: Packed4bit, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dequant_4bit` of a :class:`Packed4bit`."""
    return dequant_4bit(
        w.packed, w.absmax, w.quant_type, w.shape, w.blocksize, dtype,
        absmax2=w.absmax2, code2=w.code2, blocksize2=w.blocksize2, offset=w.offset, out=out,
    )  # fmt: skip
