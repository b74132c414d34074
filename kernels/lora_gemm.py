"""Fused LoRA GEMMs: the base product and the low-rank term in one kernel, W0 dense or 4-bit.

Forward   ``y[M, N]  = x·W0ᵀ + s·(xa·Bᵀ) (+ bias)``            (:func:`lora_fwd_fused`)
Backward  ``dx[M, K] = dy·W0 + s·(g·A) ⊙ mask/(1-p)``          (:func:`lora_dx_fused`)

The LoRA term is ``r`` extra K-steps accumulated in fp32 in the same program as the base product
(never a separate pass over the output). A 4-bit W0 is read as packed bytes and dequantised tile by
tile in registers (``load_w_tile``): no dequantised W0 ever reaches global memory on this path. The
backward reads the same bytes as the forward through transposed indexing (rows of W0 are the
reduction axis there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Packed4bit,
    cast,
    dot_precision,
    interpreting,
    load_w_tile,
    m_bucket,
    make_configs,
    mma,
    next_pow2,
    prune_by_m,
    seed_arg,
    tl_dtype,
    weight_args,
    weight_shape,
)

__all__ = ["fwd_splits", "lora_dx_fused", "lora_fwd_fused"]


def _gemm_options() -> list[dict]:
    """All configs of the two GEMMs; ``prune_by_m`` keeps those whose BLOCK_M suits the row count.
    BLOCK_K <= 64 lets a 4-bit tile load one scale per row (blocksize 64 and up); 128x256 tiles
    spill registers (compiler report, sm_90, Triton 3.6 and 3.9) and are left out."""
    small = [  # M <= 32: memory-bound on W0, many programs over N
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3),
    ]
    mid = [
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    ]
    large = [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    return small + mid + large


_INTERP = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _lora_epilogue(
    acc,
    offs_m,
    offs_n,
    pid_n,
    xa_ptr,
    stride_xas,
    stride_xam,
    xa_out_ptr,
    b_ptr,
    stride_bn,
    stride_br,
    bias_ptr,
    y_ptr,
    stride_ym,
    stride_yn,
    M,
    N,
    R,
    scaling,
    HAS_BIAS: tl.constexpr,
    XA_SPLITS: tl.constexpr,
    DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``y = acc + s·(xa·Bᵀ) (+ bias)``: the LoRA term as r extra K-steps of the fp32 tile ``acc``.
    ``xa`` is read as ``[M, r]`` (``XA_SPLITS == 0``) or summed from fp32 split-K partials, rounded to
    the activation dtype (as the reference's x·Aᵀ) and written to ``xa_out`` by the ``pid_n == 0`` tiles."""
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    m_ok = offs_m < M
    r_ok = offs_r < R
    if XA_SPLITS == 0:
        xa = tl.load(
            xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
    else:
        xa32 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
        for s in tl.static_range(XA_SPLITS):
            part = xa_ptr + s * stride_xas + offs_m[:, None] * BLOCK_R + offs_r[None, :]
            xa32 += tl.load(part, mask=m_ok[:, None], other=0.0)
        xa = cast(xa32, DTYPE)
        if pid_n == 0:
            tl.store(xa_out_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=m_ok[:, None] & r_ok[None, :])
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=(offs_n[:, None] < N) & r_ok[None, :],
        other=0.0,
    )  # [BN, BR]
    lora = mma(xa, tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, F32)
    acc += lora * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast(acc, DTYPE), mask=m_ok[:, None] & (offs_n[None, :] < N))


@triton.autotune(
    configs=make_configs("lora_fwd", _gemm_options(), _INTERP),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "QUANT", "NESTED", "DTYPE", "SPLIT", "LOOKUP"],
    prune_configs_by={"early_config_prune": prune_by_m},
)
@triton.jit
def _lora_fwd_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    w_ptr,
    stride_wn,
    stride_wk,
    q_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    xa_ptr,
    stride_xas,
    stride_xam,
    xa_out_ptr,
    b_ptr,
    stride_bn,
    stride_br,
    bias_ptr,
    y_ptr,
    stride_ym,
    stride_yn,
    part_ptr,
    M,
    N,
    K,
    R,
    K_SPLIT,
    scaling,
    M_BUCKET,
    QUANT: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    LOOKUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    XA_SPLITS: tl.constexpr,
    SPLIT: tl.constexpr,
    DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # SPLIT: program (tile, s) reduces K over [s·K_SPLIT, (s+1)·K_SPLIT) and stores an fp32 partial
    # part[s, M, N]; _lora_fwd_finalize_kernel adds the partials, the LoRA term and the bias.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    row_x = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    k_lo = pid_s * K_SPLIT

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for kk in range(0, K_SPLIT, BLOCK_K):
        k0 = k_lo + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(row_x + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        w = load_w_tile(
            w_ptr,
            stride_wn,
            stride_wk,
            q_ptr,
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            offs_n,
            k0,
            N,
            K,
            BLOCK_N,
            BLOCK_K,
            QUANT,
            NESTED,
            EVEN_K,
            QTYPE,
            BS,
            BS2,
            K_ALIGNED,
            False,
            DTYPE,
            LOOKUP,
        )  # [BN, BK]
        acc = mma(x, tl.trans(w), acc, PREC, F32)

    if SPLIT:
        ptrs = part_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=m_ok[:, None] & (offs_n[None, :] < N))
    else:
        _lora_epilogue(
            acc,
            offs_m,
            offs_n,
            pid_n,
            xa_ptr,
            stride_xas,
            stride_xam,
            xa_out_ptr,
            b_ptr,
            stride_bn,
            stride_br,
            bias_ptr,
            y_ptr,
            stride_ym,
            stride_yn,
            M,
            N,
            R,
            scaling,
            HAS_BIAS,
            XA_SPLITS,
            DTYPE,
            PREC,
            F32,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
        )


@triton.jit
def _lora_fwd_finalize_kernel(
    part_ptr,
    xa_ptr,
    stride_xas,
    stride_xam,
    xa_out_ptr,
    b_ptr,
    stride_bn,
    stride_br,
    bias_ptr,
    y_ptr,
    stride_ym,
    stride_yn,
    M,
    N,
    R,
    scaling,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    XA_SPLITS: tl.constexpr,
    DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN] sum of the split-K partials
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    _lora_epilogue(
        acc,
        offs_m,
        offs_n,
        pid_n,
        xa_ptr,
        stride_xas,
        stride_xam,
        xa_out_ptr,
        b_ptr,
        stride_bn,
        stride_br,
        bias_ptr,
        y_ptr,
        stride_ym,
        stride_yn,
        M,
        N,
        R,
        scaling,
        HAS_BIAS,
        XA_SPLITS,
        DTYPE,
        PREC,
        F32,
        BLOCK_M,
        BLOCK_N,
        BLOCK_R,
    )


@triton.autotune(
    configs=make_configs("lora_dx", _gemm_options(), _INTERP),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "QUANT", "NESTED", "DTYPE", "DROPOUT", "LOOKUP"],
    prune_configs_by={"early_config_prune": prune_by_m},
)
@triton.jit
def _lora_dx_kernel(
    dy_ptr,
    stride_dm,
    stride_dn,
    w_ptr,
    stride_wn,
    stride_wk,
    q_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    g_ptr,
    stride_gm,
    a_ptr,
    stride_ar,
    stride_ak,
    dx_ptr,
    stride_xm,
    stride_xk,
    M,
    N,
    K,
    R,
    scaling,
    seed_ptr,
    p,
    M_BUCKET,
    QUANT: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    LOOKUP: tl.constexpr,
    DROPOUT: tl.constexpr,
    DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Output tile dx[BM, BK]; the reduction runs over N in steps of BLOCK_N. (BLOCK_N/BLOCK_K keep
    # their forward meaning, "tile of W0's rows" and "tile of W0's columns", so both kernels share configs.)
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    m_ok = offs_m < M
    k_ok = offs_k < K
    row_dy = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dm  # [BM, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # [BM, BK]
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        dy = tl.load(row_dy + offs_n[None, :] * stride_dn, mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        w = load_w_tile(
            w_ptr,
            stride_wn,
            stride_wk,
            q_ptr,
            absmax_ptr,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            offs_n,
            pid_k * BLOCK_K,
            N,
            K,
            BLOCK_N,
            BLOCK_K,
            QUANT,
            NESTED,
            EVEN_K,
            QTYPE,
            BS,
            BS2,
            K_ALIGNED,
            False,
            DTYPE,
            LOOKUP,
        )  # [BN, BK]: W0's rows n0.. (reduction), columns of this output tile
        acc = mma(dy, w, acc, PREC, F32)

    # LoRA: s·(g·A) over r extra steps, masked by the forward's dropout keep-mask.
    r_ok = offs_r < R
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0
    )  # [BR, BK]
    lora = mma(g, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PREC, F32) * scaling
    if DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offs_m[:, None] * K + offs_k[None, :]) >= p
        lora = tl.where(keep, lora * (1.0 / (1.0 - p)), 0.0)
    acc += lora
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    tl.store(dx_ptrs, cast(acc, DTYPE), mask=m_ok[:, None] & k_ok[None, :])


def _common_consts(x: torch.Tensor) -> dict:
    return dict(DTYPE=tl_dtype(x.dtype), PREC=dot_precision(x.dtype), F32=interpreting())


def fwd_splits(m: int, k: int) -> int:
    """Split-K factor of the fused forward: with few rows one program per output tile leaves most of
    the GPU idle (M = 16, N = 4096, BLOCK_N = 64: 64 programs for 132 SMs), so K is split."""
    if m > 32:
        return 1
    if interpreting():
        return 2 if k >= 128 else 1
    return max(1, min(16, k // 512))


def lora_fwd_fused(
    x: torch.Tensor,
    w: torch.Tensor | Packed4bit,
    lora_B: torch.Tensor,
    scaling: float,
    xa: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    xa_splits: int = 0,
    xa_out: torch.Tensor | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·W0ᵀ + s·(xa·Bᵀ) (+ bias)``; the LoRA term accumulates in the base product's fp32 tile.

    Args:
        x: ``[M, K]`` (any strides), bf16/fp16/fp32.
        w: W0 as a dense ``[N, K]`` tensor (any strides) or a :class:`Packed4bit`.
        lora_B: ``[N, r]``.
        xa: ``x·Aᵀ`` as ``[M, r]`` in x's dtype (unit column stride) when ``xa_splits == 0``; else the
            fp32 split-K partials ``[xa_splits, M, BLOCK_R]`` from ``lora_down`` -- the kernel sums
            them, rounds to x's dtype and writes the result to ``xa_out`` (``[M, r]``, contiguous).
        bias: ``[N]`` or None.
        splits: split-K factor (default :func:`fwd_splits`). Above 1 the GEMM writes fp32 partials
            and a small second kernel adds them with the LoRA term and the bias.
    """
    m, k = x.shape
    n, kw = weight_shape(w)
    r = lora_B.shape[1]
    assert kw == k and lora_B.shape[0] == n
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    wargs, wconst = weight_args(w)
    xa_strides, xa_out = xa_operand(xa, xa_splits, xa_out)
    splits = fwd_splits(m, k) if splits is None else splits
    k_split = triton.cdiv(triton.cdiv(k, splits), 128) * 128  # a multiple of every BLOCK_K
    splits = triton.cdiv(k, k_split)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    consts = dict(HAS_BIAS=bias is not None, XA_SPLITS=xa_splits, BLOCK_R=next_pow2(r), **_common_consts(x))
    bias_arg = bias if bias is not None else x

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

    _lora_fwd_kernel[grid](
        x, x.stride(0), x.stride(1), *wargs, xa, *xa_strides, xa_out,
        lora_B, lora_B.stride(0), lora_B.stride(1), bias_arg, out, out.stride(0), out.stride(1), part,
        m, n, k, r, k_split, float(scaling), m_bucket(m),
        SPLIT=splits > 1, enable_fp_fusion=False, **wconst, **consts,
    )  # fmt: skip
    if splits > 1:
        finalize_split(part, x, xa, xa_splits, xa_out, lora_B, scaling, bias, out)
    return out


def xa_operand(xa: torch.Tensor, xa_splits: int, xa_out: torch.Tensor | None) -> tuple[tuple[int, int], torch.Tensor]:
    """``((stride_xas, stride_xam), xa_out)`` of the forward kernels' ``xa`` argument: ``[M, r]`` in x's
    dtype (unit column stride) without splits, else fp32 partials summed into ``xa_out``."""
    if xa_splits:
        assert xa_out is not None and xa.dtype == torch.float32
        return (xa.stride(0), 0), xa_out
    assert xa.stride(1) == 1
    return (0, xa.stride(0)), xa


def finalize_split(part, x, xa, xa_splits, xa_out, lora_B, scaling, bias, out) -> None:
    """``out = Σ_s part[s] + s·(xa·Bᵀ) (+ bias)``: the epilogue of a split-K forward (``part``: fp32
    ``[S, M, N]``; ``xa``/``xa_splits``/``xa_out`` as in :func:`lora_fwd_fused`)."""
    m, n = out.shape
    r = lora_B.shape[1]
    xa_strides, xa_out = xa_operand(xa, xa_splits, xa_out)
    bm, bn = 16, 64 if interpreting() else 128
    _lora_fwd_finalize_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        part, xa, *xa_strides, xa_out, lora_B, lora_B.stride(0), lora_B.stride(1), bias if bias is not None else x,
        out, out.stride(0), out.stride(1), m, n, r, float(scaling),
        SPLITS=part.shape[0], HAS_BIAS=bias is not None, XA_SPLITS=xa_splits, BLOCK_R=next_pow2(r),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, **_common_consts(x),
    )  # fmt: skip


def lora_dx_fused(
    dy: torch.Tensor,
    w: torch.Tensor | Packed4bit,
    lora_A: torch.Tensor,
    scaling: float,
    g: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx = dy·W0 + s·(g·A) ⊙ keep/(1-p)`` in one kernel.

    Args:
        dy: ``[M, N]`` (any strides).
        w: W0, dense ``[N, K]`` or :class:`Packed4bit` (the forward's bytes, read transposed).
        lora_A: ``[r, K]``.
        g: ``dy·B`` as ``[M, r]`` in dy's dtype (unit column stride), from ``lora_bwd_aux``.
        dropout_p, seed: the forward's dropout; the keep-mask is regenerated from ``seed``.
    """
    m, n = dy.shape
    nw, k = weight_shape(w)
    r = lora_A.shape[0]
    assert nw == n and lora_A.shape[1] == k and g.stride(1) == 1
    if out is None:
        out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    wargs, wconst = weight_args(w)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _lora_dx_kernel[grid](
        dy, dy.stride(0), dy.stride(1),
        *wargs,
        g, g.stride(0),
        lora_A, lora_A.stride(0), lora_A.stride(1),
        out, out.stride(0), out.stride(1),
        m, n, k, r, float(scaling), seed_arg(seed, dropout_p, dy), float(dropout_p), m_bucket(m),
        DROPOUT=dropout_p > 0.0, BLOCK_R=next_pow2(r),
        enable_fp_fusion=False, **wconst, **_common_consts(dy),
    )  # fmt: skip
    return out
