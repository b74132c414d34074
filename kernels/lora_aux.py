"""The LoRA-only passes around the base GEMM: down projection, the backward's one pass over dy,
and an in-place low-rank update.

* :func:`lora_down` -- ``xa = drop(x)·Aᵀ`` ``[M, r]``, optionally copying x into
  ``x_cat = [x | s·xa | 0]`` (the forward's "cat" merge).
* :func:`lora_bwd_aux` -- one program per row tile reads dy once for ``g = dy·B`` and
  ``dB = s·dyᵀ·xa``, then x once for ``dA = s·gᵀ·drop(x)``.
* :func:`lora_up_add` -- ``out += s·(L·R) ⊙ keep/(1-p)`` in place (the cuBLAS path's LoRA merge).

Dropout keep-masks come from ``tl.rand(seed, m·K + k)`` (Philox), identical in every kernel here and
in every launch: a mask is regenerated, never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    cast,
    dot_precision,
    dropout_scale,
    interpreting,
    launcher,
    mma,
    next_pow2,
    seed_arg,
    seed_tensor,
)

__all__ = ["dropout_keep_mask", "lora_bwd_aux", "lora_down", "lora_up_add"]


def _meta(**default) -> dict:
    """Launch meta-parameters: these kernels accumulate with atomics or update in place, so they are
    not autotuned (re-running a config would add twice); the values were picked by measurement
    (bench/NOTES.md). The interpreter runs one stage."""
    if interpreting():
        default.update(num_warps=4, num_stages=1)
    return default


def _consts(dtype: torch.dtype) -> dict:
    return dict(PREC=dot_precision(dtype), F32=interpreting())


# ----------------------------------------------------------------------------------------------
# down projection
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lora_down_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    a_ptr,
    stride_ar,
    stride_ak,
    xa_ptr,
    xcat_ptr,
    stride_cm,
    M,
    K,
    R,
    RP,
    scaling,
    seed_ptr,
    p,
    CAT: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    DTYPE = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask = m_ok[:, None] & (offs_k[None, :] < K)
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0
        )
        if CAT:
            tl.store(xcat_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_k[None, :], x, mask=mask)
        xd = cast(dropout_scale(x, offs_m, offs_k, K, seed_ptr, p, DROPOUT), DTYPE)  # [BM, BK]
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_ok[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )  # [BR, BK]
        acc = mma(xd, tl.trans(a), acc, PREC, F32)
    xa = cast(acc, DTYPE)
    tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=m_ok[:, None] & r_ok[None, :])
    if CAT:  # tail of x_cat: s·xa, then zeros up to RP (the aligned width)
        tail = cast(xa.to(tl.float32) * scaling, DTYPE)
        ptrs = xcat_ptr + offs_m[:, None].to(tl.int64) * stride_cm + K + offs_r[None, :]
        tl.store(ptrs, tail, mask=m_ok[:, None] & (offs_r[None, :] < RP))


def lora_down(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
    cat_width: int = 0,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``xa = drop(x)·Aᵀ``.

    Args:
        x: ``[M, K]`` (any strides). lora_A: ``[r, K]``.
        cat_width: > 0 also returns ``x_cat [M, K + cat_width] = [x | s·xa | 0]``
            (``cat_width >= r``), so that a single GEMM against ``[W0 | B | 0]`` gives the whole output.

    Returns:
        ``(xa [M, r] in x's dtype, x_cat or None)``.
    """
    m, k = x.shape
    r = lora_A.shape[0]
    br = next_pow2(r)
    assert cat_width == 0 or r <= cat_width <= br
    meta = _meta(BLOCK_M=16 if m <= 8192 else 32, BLOCK_K=64 if interpreting() else 128, num_warps=4, num_stages=3)
    xa = torch.empty((m, r), dtype=x.dtype, device=x.device)
    xcat = torch.empty((m, k + cat_width), dtype=x.dtype, device=x.device) if cat_width else None
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    launcher(_lora_down_kernel, x)[grid](
        x, x.stride(0), x.stride(1),
        lora_A, lora_A.stride(0), lora_A.stride(1),
        xa, xcat if xcat is not None else xa, xcat.stride(0) if xcat is not None else 0,
        m, k, r, cat_width, float(scaling), seed_arg(seed, dropout_p, x), float(dropout_p),
        CAT=xcat is not None, DROPOUT=dropout_p > 0.0, BLOCK_R=br,
        **meta, **_consts(x.dtype),
    )  # fmt: skip
    return xa, xcat


# ----------------------------------------------------------------------------------------------
# backward: one pass over dy (g, dB), one over x (dA)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lora_bwd_aux_kernel(
    dy_ptr,
    stride_dm,
    stride_dn,
    b_ptr,
    stride_bn,
    stride_br,
    xa_ptr,
    stride_xam,
    x_ptr,
    stride_xm,
    stride_xk,
    g_ptr,
    da_ptr,
    db_ptr,
    M,
    N,
    K,
    R,
    scaling,
    seed_ptr,
    p,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    DTYPE = dy_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    m_ok = offs_m < M
    r_ok = offs_r < R
    xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)

    # Pass over dy: g = dy·B for these rows (complete), dB += s·dyᵀ·xa (fp32 atomics over row tiles).
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = offs_n < N
        mask = m_ok[:, None] & n_ok[None, :]
        dy = tl.load(
            dy_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BN, BR]
        g = mma(dy, b, g, PREC, F32)
        db = mma(tl.trans(dy), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), PREC, F32)  # [BN, BR]
        tl.atomic_add(db_ptr + offs_n[:, None] * BLOCK_R + offs_r[None, :], db * scaling, mask=n_ok[:, None])
    gd = cast(g, DTYPE)  # rounded as the reference's dy·B
    tl.store(g_ptr + offs_m[:, None] * R + offs_r[None, :], gd, mask=m_ok[:, None] & r_ok[None, :])

    # Pass over x: dA += s·gᵀ·drop(x).
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        xd = cast(dropout_scale(x, offs_m, offs_k, K, seed_ptr, p, DROPOUT), DTYPE)  # [BM, BK]
        da = mma(tl.trans(gd), xd, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), PREC, F32)  # [BR, BK]
        tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da * scaling, mask=k_ok[None, :])


def lora_bwd_aux(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LoRA part of the backward in one launch.

    Args:
        dy: ``[M, N]``; x: ``[M, K]`` (any strides); xa: the forward's ``drop(x)·Aᵀ`` ``[M, r]``.

    Returns:
        ``(g [M, r], dA [r, K], dB [N, r])``; ``g = dy·B`` in dy's dtype,
        ``dA``/``dB`` in ``lora_A``/``lora_B``'s dtype.
    """
    m, n = dy.shape
    k = x.shape[1]
    r = lora_A.shape[0]
    br = next_pow2(r)
    meta = _meta(BLOCK_M=16 if m <= 64 else 64 if m <= 8192 else 128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    acc = torch.zeros(br * k + n * br, dtype=torch.float32, device=dy.device)  # one memset for dA and dB
    da32, db32 = acc[: br * k].view(br, k), acc[br * k :].view(n, br)
    g = torch.empty((m, r), dtype=dy.dtype, device=dy.device)
    launcher(_lora_bwd_aux_kernel, dy)[(triton.cdiv(m, meta["BLOCK_M"]),)](
        dy, dy.stride(0), dy.stride(1),
        lora_B, lora_B.stride(0), lora_B.stride(1),
        xa, xa.stride(0),
        x, x.stride(0), x.stride(1),
        g,
        da32, db32,
        m, n, k, r, float(scaling), seed_arg(seed, dropout_p, dy), float(dropout_p),
        DROPOUT=dropout_p > 0.0, BLOCK_R=br,
        **meta, **_consts(dy.dtype),
    )  # fmt: skip
    return g, da32[:r].to(lora_A.dtype, copy=True), db32[:, :r].to(lora_B.dtype, copy=True)


# ----------------------------------------------------------------------------------------------
# out += s·(L·R) ⊙ mask, in place
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lora_up_kernel(
    out_ptr,
    stride_om,
    stride_on,
    l_ptr,
    stride_lm,
    r_ptr,
    stride_rr,
    stride_rn,
    M,
    N,
    R,
    scaling,
    seed_ptr,
    p,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    DTYPE = out_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    m_ok, n_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
    lm = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    rm = tl.load(
        r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn, mask=r_ok[:, None] & n_ok[None, :], other=0.0
    )  # [BR, BN]
    lora = mma(lm, rm, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, F32) * scaling
    if DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offs_m[:, None] * N + offs_n[None, :]) >= p
        lora = tl.where(keep, lora * (1.0 / (1.0 - p)), 0.0)
    mask = m_ok[:, None] & n_ok[None, :]
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    base = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, cast(base + lora, DTYPE), mask=mask)


def lora_up_add(
    out: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """``out += s·(left·right) ⊙ keep/(1-p)`` in place (fp32 sum, one rounding).

    Args:
        out: ``[M, N]``; left: ``[M, r]`` (unit column stride); right: ``[r, N]`` (any strides, e.g. ``Bᵀ``).
        dropout_p, seed: the keep-mask over ``out``'s elements (for dx: the forward's mask over x).
    """
    m, n = out.shape
    r = left.shape[1]
    assert left.stride(1) == 1 and right.shape == (r, n)
    meta = _meta(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    launcher(_lora_up_kernel, out)[grid](
        out, out.stride(0), out.stride(1),
        left, left.stride(0),
        right, right.stride(0), right.stride(1),
        m, n, r, float(scaling), seed_arg(seed, dropout_p, out), float(dropout_p),
        DROPOUT=dropout_p > 0.0, BLOCK_R=next_pow2(r),
        **meta, **_consts(out.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# the keep-mask itself (tests, debugging): the same Philox draw every kernel above makes
# ----------------------------------------------------------------------------------------------
@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed_ptr, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    keep = tl.rand(tl.load(seed_ptr), offs_m[:, None] * K + offs_k[None, :]) >= p
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(m: int, k: int, p: float, seed: torch.Tensor | int, device: torch.device | str) -> torch.Tensor:
    """The bool ``[m, k]`` keep-mask that the LoRA kernels draw for ``(p, seed)`` (True = kept)."""
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    seed_t = seed_tensor(seed, out.device)
    launcher(_keep_mask_kernel, out)[(triton.cdiv(m, 32), triton.cdiv(k, 64))](
        out, m, k, seed_t, float(p), BLOCK_M=32, BLOCK_K=64
    )
    return out.bool()
