"""Small-M forward on a 4-bit W0: ``y = x·W0ᵀ + s·(xa·Bᵀ) (+ bias)`` for decode / eval batches.

At M <= 64 the forward's floor is reading W0 (N·K/2 bytes of codes), not its FLOPs, so this kernel
differs from :func:`lora_fwd_fused` in how it touches the weight:

* the packed codes are loaded as **32-bit words** (8 codes each, one ``[BN, BK/8]`` load per tile;
  the GEMMs' per-element byte loads read every byte twice and issue eight times as many loads).
  ``slots=True``: the codes are never reordered -- the tile product is the sum of eight per-slot
  products, slot ``j`` pairing code ``j`` of every word with x's columns ``8·word + j`` (x is tiny and
  read strided from cache); ``slots=False``: the codes are put in column order and the tile is one
  product;
* a code becomes its value by one warp shuffle (``LOOKUP == SHFL``, inline PTX: each lane holds
  ``table[lane % 16]`` and reads lane ``code``), or by :func:`code_lookup`'s select tree / gathers;
* the product is computed **transposed** (``SWAP``): ``yᵀ[BN, BM] += W0[BN, BW]·xᵀ[BW, BM]``, so the
  dequantised tile is the MMA's M-side operand (64-128 rows) and the few rows of x its N side;
* K is split over programs (fp32 partials ``[S, M, N]``), then ``_lora_fwd_finalize_kernel`` adds the
  partials, the LoRA term and the bias -- the same epilogue as the split fused forward.

Values are those of :func:`load_w_tile` (``code[q]·scale`` in fp32 rounded once, bit-identical to
bitsandbytes). Measured on an H100 (bench/NOTES.md, v5): 2.6-3x faster than the fused GEMM at M = 16
but ~2.1-2.4x bf16 cuBLAS, latency-bound whatever the lookup or tile order; ``auto`` takes it at M = 1. Requirements (:func:`small_supported`): ``K % 8 == 0``, a blocksize of at least 8 and
word-aligned packed storage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    NF4_LOOKUPS,
    Packed4bit,
    block_scale,
    cast,
    code_lookup,
    interpreting,
    make_configs,
    mma,
    nf4_lookup,
    tl_dtype,
    weight_args,
)
from .lora_gemm import finalize_split

__all__ = ["lora_fwd_small", "small_lookup", "small_splits", "small_supported"]

# Largest M the kernel is meant for (one to four 16-row tiles of x per program's K slice).
SMALL_MAX_M = 64


def _options() -> list[dict]:
    """BLOCK_K = 8 x the words per row a program loads per step (16 or 32: each of the eight per-slot
    products needs a reduction of at least 16)."""
    return [
        dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3),
        dict(BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=5),
    ]


_INTERP = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)


def _shfl_asm(table: tuple[int, ...]) -> str:
    """PTX: two packed words in (``$16``, ``$17``), the fp32 bit patterns of their 8 codes each out
    (``$2j``/``$2j+1``: code slot ``j`` of word 0/1). Every lane first builds ``table[lane % 16]`` by
    a select tree on its lane id, then each code is one ``shfl.sync.idx`` from lane ``code``: one
    shuffle per weight, no memory access. (Executed by all 32 lanes alike, as ``shfl.sync`` needs.)"""
    lines = [
        "{",
        ".reg .b32 ln, bit, tb, q, t<8>, u<4>, v<2>;",
        ".reg .pred p<4>;",
        "mov.u32 ln, %laneid;",
    ]
    for b in range(4):
        lines += [f"and.b32 bit, ln, {1 << b};", f"setp.ne.u32 p{b}, bit, 0;"]
    for i in range(8):
        lines.append(f"selp.b32 t{i}, {table[2 * i + 1]}, {table[2 * i]}, p0;")
    for i in range(4):
        lines.append(f"selp.b32 u{i}, t{2 * i + 1}, t{2 * i}, p1;")
    lines += ["selp.b32 v0, u1, u0, p2;", "selp.b32 v1, u3, u2, p2;", "selp.b32 tb, v1, v0, p3;"]
    for word in range(2):
        for j in range(8):
            shift = 8 * (j // 2) + 4 * (1 - j % 2)
            lines += [f"bfe.u32 q, ${16 + word}, {shift}, 4;", f"shfl.sync.idx.b32 ${2 * j + word}, tb, q, 31, -1;"]
    lines.append("}")
    return "\n".join(lines)


# bitsandbytes' tables as fp32 bit patterns (int32), code order; tests check them against code_value.
NF4_BITS = (
    -1082130432, -1087227471, -1090098384, -1094045024, -1097751987, -1103284929, -1111852943, 0,
    1034091263, 1042598627, 1048315101, 1051525946, 1054975160, 1058015147, 1060705203, 1065353216,
)  # fmt: skip
FP4_BITS = (
    0, 1001040555, 1059760811, 1065353216, 1051372203, 1056964608, 1042983595, 1048576000,
    -2147483648, -1146443093, -1087722837, -1082130432, -1096111445, -1090519040, -1104500053, -1098907648,
)  # fmt: skip
_NF4_SHFL: tl.constexpr = tl.constexpr(_shfl_asm(NF4_BITS))
_FP4_SHFL: tl.constexpr = tl.constexpr(_shfl_asm(FP4_BITS))
# pack=2: two registers per output (8 outputs), then the two input words.
_SHFL_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 2))
SHFL = 3  # the LOOKUP value of the shuffle decoder (GPU only; the interpreter cannot run PTX)


@triton.jit
def _decode_slot(words, j: tl.constexpr, QTYPE: tl.constexpr, LOOKUP: tl.constexpr):
    """fp32 value of code slot ``j`` (0..7, column ``8·word + j``) of every word: in a little-endian
    word code ``j`` sits in byte ``j // 2``, the even one in the high nibble."""
    nib = (words >> ((j // 2) * 8 + (1 - j % 2) * 4)) & 15
    return code_lookup(nib, QTYPE, LOOKUP)


@triton.jit
def _decode8(words, QTYPE: tl.constexpr, LOOKUP: tl.constexpr):
    """The 8 code values (fp32) of every word of ``words`` (int32 ``[BN, BW]``), one tensor per slot."""
    if LOOKUP == 3:
        asm: tl.constexpr = _NF4_SHFL if QTYPE == 0 else _FP4_SHFL
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            asm, _SHFL_CONSTRAINTS, [words], dtype=(tl.int32,) * 8, is_pure=True, pack=2
        )
        return (
            v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True),
            v2.to(tl.float32, bitcast=True), v3.to(tl.float32, bitcast=True),
            v4.to(tl.float32, bitcast=True), v5.to(tl.float32, bitcast=True),
            v6.to(tl.float32, bitcast=True), v7.to(tl.float32, bitcast=True),
        )  # fmt: skip
    else:
        return (
            _decode_slot(words, 0, QTYPE, LOOKUP), _decode_slot(words, 1, QTYPE, LOOKUP),
            _decode_slot(words, 2, QTYPE, LOOKUP), _decode_slot(words, 3, QTYPE, LOOKUP),
            _decode_slot(words, 4, QTYPE, LOOKUP), _decode_slot(words, 5, QTYPE, LOOKUP),
            _decode_slot(words, 6, QTYPE, LOOKUP), _decode_slot(words, 7, QTYPE, LOOKUP),
        )  # fmt: skip


@triton.jit
def _slot_mma(acc, v, scale, j: tl.constexpr, x_cols, offs_m, m_ok, offs_w, K, stride_xk,
              SWAP: tl.constexpr, DTYPE: tl.constexpr, F32: tl.constexpr):  # fmt: skip
    """``acc += W0[:, 8·w + j]·x[:, 8·w + j]ᵀ`` over the tile's words ``w``: slot ``j``'s values
    ``v`` (fp32 ``[BN, BW]``) times their scales, rounded once to the activation dtype."""
    w = cast(v * scale, DTYPE)  # [BN, BW]
    cols = offs_w * 8 + j  # [BW]
    x = tl.load(x_cols + cols[:, None] * stride_xk, mask=(cols[:, None] < K) & m_ok[None, :], other=0.0)  # [BW, BM]
    if SWAP:
        return mma(w, x, acc, "ieee", F32)
    else:
        return mma(tl.trans(x), tl.trans(w), acc, "ieee", F32)


@triton.autotune(
    configs=make_configs("lora_small", _options(), _INTERP),
    key=["M_BUCKET", "N", "K", "NESTED", "QTYPE", "BS", "LOOKUP", "SWAP", "SLOTS", "DTYPE"],
)
@triton.jit
def _small_fwd_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    q32_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    part_ptr,
    M,
    N,
    K,
    K_SPLIT,
    M_BUCKET,
    NESTED: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    LOOKUP: tl.constexpr,
    SWAP: tl.constexpr,
    SLOTS: tl.constexpr,
    DTYPE: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (n tile, K slice s, m tile): part[s, m, n] = sum over the slice of x[m, k]·W0[n, k].
    # The weight tile is read as words (8 codes each) and never reordered: the product is the sum of
    # eight per-slot products, slot j pairing code j of every word with x's columns 8·word + j.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    n_ok = offs_n < N
    m_ok = offs_m < M
    WORDS: tl.constexpr = BLOCK_K // 8
    row_w = q32_ptr + offs_n[:, None].to(tl.int64) * (K // 8)  # [BN, 1] first word of each row
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # [1, BM]
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)

    if SWAP:  # noqa: SIM108 (a constexpr branch: a conditional expression does not compile)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [BN, BM] = yᵀ tile
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, WORDS)  # [BW] word index inside a row
        w_ok = n_ok[:, None] & (offs_w[None, :] < K // 8)  # [BN, BW]
        words = tl.load(row_w + offs_w[None, :], mask=w_ok, other=0)  # [BN, BW] int32
        # A word's 8 codes share one scale block (K % 8 == 0, blocksize a multiple of 8).
        blk = (offs_n[:, None] * K + offs_w[None, :] * 8) // BS  # [BN, BW]
        scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, w_ok, BS2, NESTED)
        if SLOTS:
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode8(words, QTYPE, LOOKUP)
            acc = _slot_mma(acc, v0, scale, 0, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v1, scale, 1, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v2, scale, 2, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v3, scale, 3, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v4, scale, 4, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v5, scale, 5, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v6, scale, 6, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
            acc = _slot_mma(acc, v7, scale, 7, x_cols, offs_m, m_ok, offs_w, K, stride_xk, SWAP, DTYPE, F32)
        else:
            # Natural column order: split each word into its 8 codes along a third axis, merge it into
            # the columns, and take the whole tile in one product.
            sub = tl.arange(0, 8)  # [8] code slot j: byte j // 2, the even one in the high nibble
            nib = (words[:, :, None] >> ((sub // 2) * 8 + (1 - sub % 2) * 4)[None, None, :]) & 15  # [BN, BW, 8]
            nib = tl.reshape(nib, (BLOCK_N, BLOCK_K))  # [BN, BK]
            full = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, WORDS, 8)), (BLOCK_N, BLOCK_K))
            w = cast(code_lookup(nib, QTYPE, LOOKUP) * full, DTYPE)  # [BN, BK]
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_cols + offs_k[:, None] * stride_xk, mask=(offs_k[:, None] < K) & m_ok[None, :], other=0.0)
            if SWAP:  # noqa: SIM108 (a constexpr branch)
                acc = mma(w, x, acc, "ieee", F32)
            else:
                acc = mma(tl.trans(x), tl.trans(w), acc, "ieee", F32)

    base = part_ptr + pid_s * M * N
    if SWAP:
        tl.store(base + offs_m[None, :] * N + offs_n[:, None], acc, mask=n_ok[:, None] & m_ok[None, :])
    else:
        tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def small_lookup(name: str | None = None, slots: bool = True) -> int:
    """The ``LOOKUP`` constexpr of this kernel for ``name``: "shfl" (the warp-shuffle decoder, whole
    words: ``slots`` only) or a key of ``NF4_LOOKUPS``; None means the lookup in force
    (:func:`fastlora.kernels.set_nf4_lookup`), whose "auto" here is "shfl" (with ``slots``, else
    "gather1d"). Under the interpreter "shfl" becomes the select tree (no PTX there)."""
    name = nf4_lookup() if name is None else name
    if name == "auto":
        name = "shfl" if slots else "gather1d"
    if name == "shfl":
        if not slots:
            raise ValueError("fastlora.kernels: the shfl lookup decodes whole words (slots=True)")
        return NF4_LOOKUPS["select"] if interpreting() else SHFL
    if name not in NF4_LOOKUPS:
        raise ValueError(f"fastlora.kernels: unknown 4-bit lookup {name!r}; known: shfl, {', '.join(NF4_LOOKUPS)}")
    return NF4_LOOKUPS[name]


def small_supported(x: torch.Tensor, w: torch.Tensor | Packed4bit) -> bool:
    """Whether :func:`lora_fwd_small` takes these operands: a 4-bit W0 with ``K % 8 == 0`` (rows of
    whole words) and a blocksize of at least 8, its packed bytes 4-byte aligned (read as words),
    bf16/fp16 x, M <= 64."""
    if not isinstance(w, Packed4bit) or x.dtype == torch.float32:
        return False
    return (
        x.shape[0] <= SMALL_MAX_M
        and w.shape[1] % 8 == 0
        and w.blocksize >= 8
        and w.packed.data_ptr() % 4 == 0
        and w.packed.is_contiguous()
    )


def small_splits(m: int, n: int, k: int) -> int:
    """Split-K factor: enough programs for every SM (132 on an H100) with few N tiles, and K slices
    of at least 512 columns (two to four steps of BLOCK_K)."""
    if interpreting():
        return 2 if k >= 128 else 1
    return max(1, min(16, k // 512, triton.cdiv(8 * 132, max(1, triton.cdiv(n, 128)))))


def lora_fwd_small(
    x: torch.Tensor,
    w: Packed4bit,
    lora_B: torch.Tensor,
    scaling: float,
    xa: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    xa_splits: int = 0,
    xa_out: torch.Tensor | None = None,
    splits: int | None = None,
    swap: bool = True,
    slots: bool = True,
    lookup: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·W0ᵀ + s·(xa·Bᵀ) (+ bias)`` for few rows and a 4-bit W0 (see the module docstring).

    Arguments as :func:`fastlora.kernels.lora_fwd_fused` (``xa``/``xa_splits``/``xa_out`` alike), plus
    ``swap`` (compute yᵀ, the default), ``slots`` (eight per-slot products per tile, the default; else
    the codes are put in column order and the tile is one product) and ``lookup`` (see
    :func:`small_lookup`; "shfl" needs ``slots``). Check :func:`small_supported` first.
    """
    m, k = x.shape
    n = w.shape[0]
    assert small_supported(x, w) and lora_B.shape[0] == n
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args, wconst = weight_args(w)
    lookup_code = small_lookup(lookup, slots)
    splits = small_splits(m, n, k) if splits is None else splits
    k_split = triton.cdiv(triton.cdiv(k, splits), 256) * 256  # a multiple of every BLOCK_K
    splits = triton.cdiv(k, k_split)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    packed = w.packed if w.packed.dtype == torch.uint8 else w.packed.view(torch.uint8)
    words = packed.reshape(-1).view(torch.int32)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits, triton.cdiv(m, bm))  # noqa: E731
    consts = dict(DTYPE=tl_dtype(x.dtype), F32=interpreting())
    _small_fwd_kernel[grid](
        x, x.stride(0), x.stride(1), words, *args[4:], part, m, n, k, k_split, bm,
        NESTED=wconst["NESTED"], QTYPE=wconst["QTYPE"], BS=wconst["BS"], BS2=wconst["BS2"],
        LOOKUP=lookup_code, SWAP=swap, SLOTS=slots, BLOCK_M=bm, enable_fp_fusion=False, **consts,
    )  # fmt: skip
    finalize_split(part, x, xa, xa_splits, xa_out, lora_B, scaling, bias, out)
    return out
