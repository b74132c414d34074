"""Shared pieces of the fastlora Triton kernels: interpreter detection, launch sites, 4-bit code tables, dropout.

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


def launcher(kernel, like: torch.Tensor):
    """``kernel`` as the launch site should call it: the raw Triton kernel for plain tensors (eager:
    no higher-order-op dispatch), or ``torch.library.wrap_triton(kernel)`` while a ``triton_op`` body
    is traced by torch.compile (fake/functional tensors), so that Inductor records and launches it."""
    if type(like) is torch.Tensor:
        return kernel
    return torch.library.wrap_triton(kernel)


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
# The dequantisation kernel uses "gather": measured fastest on an H100 with Triton 3.6 (2.3x the
# select tree at 4096x4096, 1.2x at the 14336-wide shapes; bench/NOTES.md). The others stay
# selectable per call (``dequant_4bit(lookup=...)``) for the benchmark and the tests.
NF4_LOOKUPS = {"select": 0, "gather": 1, "gather1d": 2}


def lookup_code(name: str) -> int:
    """The ``LOOKUP`` constexpr of lookup ``name`` (a key of :data:`NF4_LOOKUPS`)."""
    if name not in NF4_LOOKUPS:
        raise ValueError(f"fastlora.kernels: 4-bit lookup must be one of {', '.join(NF4_LOOKUPS)}, got {name!r}")
    return NF4_LOOKUPS[name]


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

    @triton.jit
    def mul_rn(a, b):
        """fp32 ``a * b`` (the interpreter computes in numpy: no FMA is ever formed)."""
        return a * b

else:

    @triton.jit
    def cast(x, OUT: tl.constexpr):
        """``x.to(OUT)`` rounding to nearest even."""
        return x.to(OUT)

    @triton.jit
    def mul_rn(a, b):
        """fp32 ``a * b`` rounded on its own: ``mul.rn`` is never contracted with a following add into
        an FMA (kernels launched by Inductor cannot pass ``enable_fp_fusion=False``)."""
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )


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
    ``code2[q[blk]] * absmax2[blk // BS2]`` then ``+ offset[0]`` (two fp32 roundings, as bnb: the
    product is a ``mul_rn``, so no FMA is formed)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0)
        scale = mul_rn(tl.load(code2_ptr + q, mask=mask, other=0.0), s2)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


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
