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

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (read at import: Triton decorates kernels for the
    interpreter only if the variable is set before they are defined)."""
    return _INTERPRETING


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
    quant_type: str  # "nf4" or "fp4": bitsandbytes' value tables, built into the kernels
    shape: tuple[int, int]  # (N, K)
    blocksize: int
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: torch.Tensor | None = None  # 0-d fp32, read on the device

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


QTYPES = {"nf4": 0, "fp4": 1}

# How the 4-bit kernels map a code to its table value (the ``LOOKUP`` constexpr of ``load_w_tile``,
# see ``code_lookup``): "select" (0) -- a 15-``tl.where`` select tree on the code's bits; "gather" (1)
# -- ``tl.gather`` from the 16-entry table broadcast to the tile's rows (warp shuffles); "gather1d" (2)
# -- a rank-1 ``tl.gather`` (through shared memory). Same values bit for bit (the exact fp32 entry).
# "auto" (the default) is what measured fastest per kernel on an H100 with Triton 3.6
# (bench/NOTES.md, bench/bench_lookup.py): "gather" in the dequantisation kernel (2.3x faster at
# 4096x4096, 1.2x at the 14336-wide shapes), "select" in the fused GEMMs (there the lookup is not the
# bottleneck and the gather measured 10-20 % slower). Read once from FASTLORA_NF4_LOOKUP (NF4 and FP4
# alike); :func:`set_nf4_lookup` switches it at run time (Triton compiles and caches one kernel per
# constexpr value, so switching costs one compile per kernel).
NF4_LOOKUPS = {"auto": None, "select": 0, "gather": 1, "gather1d": 2}


def _lookup_code(name: str) -> int | None:
    if name not in NF4_LOOKUPS:
        raise ValueError(f"fastlora.kernels: 4-bit lookup must be one of {sorted(NF4_LOOKUPS)}, got {name!r}")
    return NF4_LOOKUPS[name]


_nf4_lookup = _lookup_code(os.environ.get("FASTLORA_NF4_LOOKUP", "auto").strip() or "auto")


def set_nf4_lookup(name: str) -> None:
    """Use ``name`` (a key of :data:`NF4_LOOKUPS`) for the 4-bit code lookup of every later launch."""
    global _nf4_lookup
    _nf4_lookup = _lookup_code(name)


def nf4_lookup() -> str:
    """The 4-bit code lookup in force (a key of :data:`NF4_LOOKUPS`)."""
    return {v: k for k, v in NF4_LOOKUPS.items()}[_nf4_lookup]


def weight_args(w: torch.Tensor | Packed4bit, auto_lookup: int = 0) -> tuple[tuple, dict]:
    """Kernel arguments ``(w_ptr, stride_wn, stride_wk, q_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
    offset_ptr)`` and the constexprs of ``load_w_tile`` for a dense ``[N, K]`` matrix (any strides)
    or a :class:`Packed4bit` (``LOOKUP``: the 4-bit code lookup in force, see :func:`set_nf4_lookup`;
    under "auto" the calling kernel's ``auto_lookup``)."""
    if isinstance(w, Packed4bit):
        packed = w.packed if w.packed.dtype == torch.uint8 else w.packed.view(torch.uint8)
        packed = packed.reshape(-1)
        absmax = w.absmax.reshape(-1)
        if w.nested:
            nest = (w.absmax2, w.code2, w.offset.reshape(1).to(torch.float32))
            log2_exact(w.blocksize2)
        else:
            nest = (absmax, absmax, absmax)
        k = w.shape[1]
        args = (packed, 0, 0, packed, absmax, *nest)
        consts = dict(
            QUANT=True, NESTED=w.nested, EVEN_K=k % 2 == 0, QTYPE=QTYPES[w.quant_type], BS=w.blocksize,
            BS2=w.blocksize2 if w.nested else 256, K_ALIGNED=k % w.blocksize == 0,
            LOOKUP=auto_lookup if _nf4_lookup is None else _nf4_lookup,
        )  # fmt: skip
        log2_exact(w.blocksize)
        return args, consts
    args = (w, w.stride(0), w.stride(1), w, w, w, w, w)
    return args, dict(QUANT=False, NESTED=False, EVEN_K=True, QTYPE=0, BS=64, BS2=256, K_ALIGNED=True, LOOKUP=0)


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
def _nf4_value(nib):
    """fp32 value of 4-bit code ``nib`` (int32, any shape) by a select tree on its bits: no memory
    access (a table gather inside the main loop is turned into per-element async copies by the
    software pipeliner). Constants are the fp32 bit patterns of the table, so values are exact."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    t0 = tl.where(b0, -1087227471, -1082130432)
    t1 = tl.where(b0, -1094045024, -1090098384)
    t2 = tl.where(b0, -1103284929, -1097751987)
    t3 = tl.where(b0, 0, -1111852943)
    t4 = tl.where(b0, 1042598627, 1034091263)
    t5 = tl.where(b0, 1051525946, 1048315101)
    t6 = tl.where(b0, 1058015147, 1054975160)
    t7 = tl.where(b0, 1065353216, 1060705203)
    u0 = tl.where(b1, t1, t0)
    u1 = tl.where(b1, t3, t2)
    u2 = tl.where(b1, t5, t4)
    u3 = tl.where(b1, t7, t6)
    v0 = tl.where(b2, u1, u0)
    v1 = tl.where(b2, u3, u2)
    return tl.where(b3, v1, v0).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_value(nib):
    """fp32 value of 4-bit code ``nib`` (int32, any shape) by a select tree on its bits: no memory
    access (a table gather inside the main loop is turned into per-element async copies by the
    software pipeliner). Constants are the fp32 bit patterns of the table, so values are exact."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    t0 = tl.where(b0, 1001040555, 0)
    t1 = tl.where(b0, 1065353216, 1059760811)
    t2 = tl.where(b0, 1056964608, 1051372203)
    t3 = tl.where(b0, 1048576000, 1042983595)
    t4 = tl.where(b0, -1146443093, -2147483648)
    t5 = tl.where(b0, -1082130432, -1087722837)
    t6 = tl.where(b0, -1090519040, -1096111445)
    t7 = tl.where(b0, -1098907648, -1104500053)
    u0 = tl.where(b1, t1, t0)
    u1 = tl.where(b1, t3, t2)
    u2 = tl.where(b1, t5, t4)
    u3 = tl.where(b1, t7, t6)
    v0 = tl.where(b2, u1, u0)
    v1 = tl.where(b2, u3, u2)
    return tl.where(b3, v1, v0).to(tl.float32, bitcast=True)


@triton.jit
def code_value(nib, QTYPE: tl.constexpr):
    """fp32 value of 4-bit code ``nib``: bitsandbytes' NF4 table (``QTYPE == 0``) or FP4 table (1)."""
    if QTYPE == 0:
        return _nf4_value(nib)
    else:
        return _fp4_value(nib)


@triton.jit
def code_lookup(nib, QTYPE: tl.constexpr, LOOKUP: tl.constexpr):
    """fp32 value of the 4-bit codes ``nib`` (int32 ``[R, C]``), all variants exact:

    * ``LOOKUP == 0``: the select tree (:func:`code_value`) on every element;
    * ``LOOKUP == 1``: ``tl.gather`` along axis 1 from the 16-entry table (built once by the select
      tree on ``arange(16)``) broadcast to ``[R, 16]`` -- ``tl.gather`` needs source and index of the
      same rank with equal sizes off the gather axis; Triton lowers it to warp shuffles;
    * ``LOOKUP == 2``: the codes flattened to ``[R*C]`` and gathered from the ``[16]`` table (a rank-1
      gather is not made warp-local: Triton lowers it through shared memory, one load per element).
    """
    if LOOKUP == 0:
        return code_value(nib, QTYPE)
    elif LOOKUP == 1:
        table = code_value(tl.arange(0, 16), QTYPE)  # [16] fp32
        src = tl.broadcast_to(table[None, :], (nib.shape[0], 16))  # [R, 16]
        return tl.gather(src, nib, 1)
    else:
        table = code_value(tl.arange(0, 16), QTYPE)  # [16] fp32
        flat = tl.reshape(nib, (nib.shape[0] * nib.shape[1],))  # [R*C]
        return tl.reshape(tl.gather(table, flat, 0), (nib.shape[0], nib.shape[1]))


@triton.jit
def block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, BS2: tl.constexpr, NESTED: tl.constexpr):
    """fp32 scale of 4-bit block ``blk`` (any shape): ``absmax[blk]``, or with double quantisation
    ``code2[q[blk]] * absmax2[blk // BS2]`` then ``+ offset[0]`` (two fp32 roundings, as bnb; the
    kernels that call this are launched with ``enable_fp_fusion=False`` so no FMA is formed)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0)
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
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    offs_n,
    k0,
    N,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_K: tl.constexpr,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    BS2: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr,
    OUT: tl.constexpr,
    LOOKUP: tl.constexpr = 0,
):
    """``W0[offs_n, k0:k0+BLOCK_K]`` as a ``[BLOCK_R, BLOCK_K]`` tile of dtype ``OUT``, zero outside ``[N, K]``.

    Dense W0: a strided load. 4-bit W0 (bitsandbytes layout, see ``dequant.py``): read the packed
    bytes and dequantise in registers, each value ``code[q] * scale`` in fp32 rounded once to
    ``OUT`` -- the same numbers as ``bitsandbytes.functional.dequantize_4bit``. The code value comes
    from a select tree or a register gather (``LOOKUP``, see :func:`code_lookup`; no memory load);
    when the tile's rows lie inside single scale blocks (``K % BS == 0`` and ``BLOCK_K <= BS``) one
    scale per row is loaded, else one per element.
    ``PAIRED`` (K even) loads each byte once and interleaves its two nibbles (``tl.join``) -- used by
    the dequantisation kernel; the GEMMs load per element (a joined tile feeding ``tl.dot`` breaks
    Triton 3.6's layout passes).
    """
    if QUANT:
        row_scale: tl.constexpr = K_ALIGNED and BLOCK_K <= BS
        if PAIRED:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BH] byte column inside a row
            mask = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)  # [BR, BH]
            byte = offs_n[:, None] * (K // 2) + offs_p[None, :]  # [BR, BH]
            b = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
            if row_scale:
                blk = (offs_n * K + k0) // BS  # [BR]
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, offs_n < N, BS2, NESTED)[
                    :, None
                ]
            else:
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (byte * 2) // BS, mask, BS2, NESTED)
            hi = cast(code_lookup(b >> 4, QTYPE, LOOKUP) * scale, OUT)  # [BR, BH] even columns
            lo = cast(code_lookup(b & 15, QTYPE, LOOKUP) * scale, OUT)  # [BR, BH] odd columns
            w = tl.join(hi, lo).reshape(BLOCK_R, BLOCK_K)  # [BR, BK]
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            flat = offs_n[:, None] * K + offs_k[None, :]  # [BR, BK]
            b = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
            if EVEN_K:  # noqa: SIM108 (constexpr branch) -- the flat index has the column's parity
                nib = (b >> (((offs_k + 1) & 1) * 4)[None, :]) & 15
            else:
                nib = (b >> (((flat + 1) & 1) * 4)) & 15
            if row_scale:
                blk = (offs_n * K + k0) // BS  # [BR]
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, offs_n < N, BS2, NESTED)[
                    :, None
                ]
            else:
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BS, mask, BS2, NESTED)
            w = cast(code_lookup(nib, QTYPE, LOOKUP) * scale, OUT)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(ptrs, mask=mask, other=0.0).to(OUT)
    return w


def seed_tensor(seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The dropout seed as the kernels read it: a 1-element int32 tensor on ``device`` holding 31 bits.

    The kernels load the seed from memory rather than taking it as a launch argument, so that a seed
    drawn on the GPU (``torch.randint(..., device="cuda")``) reaches them without a host sync (no
    graph break under ``torch.compile``; a prerequisite of CUDA-graph capture). An int32 tensor is used as is;
    another integer tensor or a Python int is reduced to its low 31 bits (the same mask for both).
    """
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(
                f"fastlora.kernels: the dropout seed must be one integer, got a {seed.dtype} {tuple(seed.shape)}"
            )
        seed = seed.reshape(1).to(device)
        return seed if seed.dtype == torch.int32 else (seed.to(torch.int64) & 0x7FFFFFFF).to(torch.int32)
    return torch.tensor([int(seed) & 0x7FFFFFFF], dtype=torch.int32, device=device)


def seed_arg(seed: torch.Tensor | int, dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """The ``seed_ptr`` argument of a launch: :func:`seed_tensor` with dropout; without, any tensor on
    the device (``like``; the kernel never reads it), so no seed tensor is made per call."""
    return seed_tensor(seed, like.device) if dropout_p > 0.0 else like


@triton.jit
def dropout_scale(x, offs_m, offs_k, K, seed_ptr, p, DROPOUT: tl.constexpr):
    """``x ⊙ keep / (1 - p)`` in fp32, the keep mask regenerated from the seed at ``seed_ptr`` and the
    element's flat index ``m·K + k`` (Philox through ``tl.rand``): the same mask in forward and backward."""
    xf = x.to(tl.float32)
    if DROPOUT:
        r = tl.rand(tl.load(seed_ptr), offs_m[:, None] * K + offs_k[None, :])
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
