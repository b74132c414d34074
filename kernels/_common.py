"""Shared pieces of the fastlora Triton kernels: interpreter detection, config pinning, W-tile loading.

Everything here is model-agnostic: kernels see plain tensors (packed 4-bit bytes, scales, code
tables, dense matrices) and integers.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: fp32 activations get true fp32 products ("ieee") unless
    torch's own TF32 switch for matmuls is on, as torch.matmul would."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch float dtype."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def pinned_config(name: str) -> dict | None:
    """A config pinned through ``FASTLORA_TRITON_CONFIG_<NAME>="BLOCK_M=16,BLOCK_N=64,...,num_warps=4"``.

    Keys are the kernel's ``BLOCK_*``/``GROUP_M`` meta-parameters plus ``num_warps`` and ``num_stages``.
    Returns None when the variable is unset.
    """
    raw = os.environ.get(f"FASTLORA_TRITON_CONFIG_{name.upper()}", "").strip()
    if not raw:
        return None
    out = {}
    for item in raw.split(","):
        key, _, val = item.partition("=")
        out[key.strip()] = int(val)
    return out


def make_configs(name: str, options: list[dict], interp: dict | None = None) -> list[triton.Config]:
    """The autotune configs of kernel ``name``: ``options`` (dicts of meta-parameters plus
    ``num_warps``/``num_stages``), or just the pinned one (see :func:`pinned_config`), or under the
    interpreter ``interp`` alone (default: the first option; autotuning interpreted kernels would
    only cost time)."""
    pinned = pinned_config(name)
    if pinned is not None:
        options = [pinned]
    elif interpreting():
        options = [interp or options[0]]
    configs = []
    for opt in options:
        opt = dict(opt)
        warps, stages = opt.pop("num_warps", 4), opt.pop("num_stages", 2)
        configs.append(triton.Config(opt, num_warps=warps, num_stages=stages))
    return configs


def prune_by_m(configs, named_args, **kwargs):
    """Keep the configs whose ``BLOCK_M`` suits the launch's ``M_BUCKET`` (all of them if none does)."""
    mb = named_args["M_BUCKET"]
    lo, hi = (16, 16) if mb <= 32 else (32, 64) if mb <= 256 else (64, 256)
    kept = [c for c in configs if lo <= c.kwargs.get("BLOCK_M", lo) <= hi]
    return kept or configs


def m_bucket(m: int) -> int:
    """Autotune key for the row count: the next power of two, capped at 4096."""
    return min(4096, triton.next_power_of_2(max(1, m)))


class Packed4bit(NamedTuple):
    """A bitsandbytes 4-bit weight as plain tensors (see ``dequant.py`` for the layout)."""

    packed: torch.Tensor  # uint8 (or any dtype viewing the same bytes)
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 codes into code2 when nested
    code: torch.Tensor  # fp32 [16]
    shape: tuple[int, int]  # (N, K)
    blocksize: int
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: torch.Tensor | None = None  # 0-d fp32, read on the device

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def weight_args(w: torch.Tensor | Packed4bit) -> tuple[tuple, dict]:
    """Kernel arguments ``(w_ptr, stride_wn, stride_wk, q_ptr, absmax_ptr, code_ptr, absmax2_ptr,
    code2_ptr, offset_ptr, log2_bs, log2_bs2)`` and constexprs ``QUANT``/``NESTED``/``EVEN_K`` for a
    dense ``[N, K]`` matrix (any strides) or a :class:`Packed4bit`."""
    if isinstance(w, Packed4bit):
        packed = w.packed if w.packed.dtype == torch.uint8 else w.packed.view(torch.uint8)
        packed = packed.reshape(-1)
        if w.nested:
            off = w.offset.reshape(1).to(torch.float32)
            nest = (w.absmax2, w.code2, off, log2_exact(w.blocksize2))
        else:
            nest = (w.absmax, w.code, w.absmax, 0)
        args = (
            packed,
            0,
            0,
            packed,
            w.absmax.reshape(-1),
            w.code,
            nest[0],
            nest[1],
            nest[2],
            log2_exact(w.blocksize),
            nest[3],
        )
        return args, dict(QUANT=True, NESTED=w.nested, EVEN_K=w.shape[1] % 2 == 0)
    args = (w, w.stride(0), w.stride(1), w, w, w, w, w, w, 0, 0)
    return args, dict(QUANT=False, NESTED=False, EVEN_K=True)


def weight_shape(w: torch.Tensor | Packed4bit) -> tuple[int, int]:
    return tuple(w.shape) if isinstance(w, Packed4bit) else (w.shape[0], w.shape[1])


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


def log2_exact(n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"fastlora.kernels: block size {n} is not a power of two")
    return n.bit_length() - 1


if interpreting():

    @triton.jit
    def cast(x, OUT: tl.constexpr):
        """``x.to(OUT)`` rounding to nearest even. (The interpreter truncates fp32 -> bf16, so round
        the fp32 bit pattern first; on the GPU ``.to`` is already round-to-nearest-even.)"""
        if OUT == tl.bfloat16:  # noqa: SIM300 (a constexpr compare)
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(OUT)

else:

    @triton.jit
    def cast(x, OUT: tl.constexpr):
        """``x.to(OUT)`` rounding to nearest even."""
        return x.to(OUT)


@triton.jit
def nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, log2_bs2, NESTED: tl.constexpr):
    """fp32 scale of 4-bit block ``blk`` (any shape): ``absmax[blk]``, or with double quantisation
    ``code2[q[blk]] * absmax2[blk >> log2_bs2]`` then ``+ offset[0]`` (two fp32 roundings, as bnb; the
    kernels that call this are launched with ``enable_fp_fusion=False`` so no FMA is formed)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(absmax2_ptr + (blk >> log2_bs2), mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * s2
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def load_w_tile(
    w_ptr,
    stride_wn,
    stride_wk,
    q_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    log2_bs,
    log2_bs2,
    offs_n,
    k0,
    N,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    OUT: tl.constexpr,
):
    """``W0[offs_n, k0:k0+BLOCK_K]`` as a ``[BLOCK_R, BLOCK_K]`` tile of dtype ``OUT``, zero outside ``[N, K]``.

    Dense W0: a strided load. 4-bit W0 (bitsandbytes layout, see ``dequant.py``): read the packed
    bytes and dequantise in registers, each value ``code[q] * scale`` in fp32 rounded once to
    ``OUT`` -- the same numbers as ``bitsandbytes.functional.dequantize_4bit``. With K even every
    byte holds two neighbours of one row, so a row of the tile is ``BLOCK_K/2`` contiguous bytes;
    with K odd pairs straddle rows and each element finds its own nibble.
    """
    if QUANT:
        if EVEN_K:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BH] byte column inside a row
            mask = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)  # [BR, BH]
            byte = offs_n[:, None] * (K // 2) + offs_p[None, :]  # [BR, BH]
            b = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
            scale = nf4_scale(
                absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (byte * 2) >> log2_bs, mask, log2_bs2, NESTED
            )
            hi = cast(tl.load(code_ptr + (b >> 4)) * scale, OUT)  # [BR, BH] even columns
            lo = cast(tl.load(code_ptr + (b & 15)) * scale, OUT)  # [BR, BH] odd columns
            w = tl.join(hi, lo).reshape(BLOCK_R, BLOCK_K)  # [BR, BK]
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            flat = offs_n[:, None] * K + offs_k[None, :]  # [BR, BK]
            b = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
            nib = (b >> ((1 - (flat & 1)) * 4)) & 15
            scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat >> log2_bs, mask, log2_bs2, NESTED)
            w = cast(tl.load(code_ptr + nib) * scale, OUT)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(ptrs, mask=mask, other=0.0).to(OUT)
    return w


@triton.jit
def dropout_scale(x, offs_m, offs_k, K, seed, p, DROPOUT: tl.constexpr):
    """``x ⊙ keep / (1 - p)`` in fp32, the keep mask regenerated from ``seed`` and the element's flat
    index ``m·K + k`` (Philox through ``tl.rand``): the same mask in forward and backward."""
    xf = x.to(tl.float32)
    if DROPOUT:
        r = tl.rand(seed, offs_m[:, None] * K + offs_k[None, :])
        xf = tl.where(r >= p, xf * (1.0 / (1.0 - p)), 0.0)
    return xf


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, F32: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. fp32 operands use ``PREC`` ("ieee" or "tf32"). ``F32``
    upcasts the operands first (the interpreter's bf16 ``tl.dot`` is wrong; products are exact either way)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)
