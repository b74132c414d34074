"""4-bit (NF4 / FP4) dequantisation straight from bitsandbytes storage, bit-identical to
``bitsandbytes.functional.dequantize_4bit``.

Storage: ``W[N, K]`` flattened row-major, two 4-bit codes per byte, the first element of each pair
in the high nibble; one fp32 ``absmax`` per ``blocksize`` flat elements, or (double quantisation)
uint8 codes into the 256-entry ``code2`` map with fp32 ``absmax2`` per ``blocksize2`` blocks and a
scalar ``offset``. Value = ``code[q] · scale`` in fp32, rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NF4_LOOKUPS, Packed4bit, load_w_tile, make_configs, tl_dtype, weight_args

__all__ = ["dequant_4bit"]


def _configs():
    return make_configs(
        "dequant",
        [
            dict(BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=2),
            dict(BLOCK_R=32, BLOCK_K=64, num_warps=4, num_stages=2),
            dict(BLOCK_R=128, BLOCK_K=64, num_warps=8, num_stages=2),
            dict(BLOCK_R=16, BLOCK_K=256, num_warps=4, num_stages=2),
        ],
    )


@triton.autotune(configs=_configs(), key=["N", "K", "NESTED", "BS", "OUT", "LOOKUP"])
@triton.jit
def _dequant4_kernel(
    q_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    stride_on,
    N,
    K,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    LOOKUP: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    k0 = pid_k * BLOCK_K
    w = load_w_tile(
        q_ptr,
        0,
        0,
        q_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        offs_n,
        k0,
        N,
        K,
        BLOCK_R,
        BLOCK_K,
        True,
        NESTED,
        EVEN_K,
        QTYPE,
        BS,
        BS2,
        K_ALIGNED,
        EVEN_K,
        OUT,
        LOOKUP,
    )  # [BR, BK]  (fmt: skip)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w, mask=mask)


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
    """
    n, k = shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    assert out.dtype == dtype and out.shape[0] >= n and out.shape[1] >= k and out.stride(1) == 1
    w = Packed4bit(packed, absmax, quant_type, (n, k), blocksize, absmax2, code2, blocksize2, offset)
    args, consts = weight_args(w, auto_lookup=NF4_LOOKUPS["gather"])
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    consts.pop("QUANT")
    _dequant4_kernel[grid](*args[3:], out, out.stride(0), n, k, OUT=tl_dtype(dtype), enable_fp_fusion=False, **consts)
    return out
