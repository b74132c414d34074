"""Grouped LoRA ops: several projections that read one input as one autograd op, and the gated MLP.

Grouped projections (q/k/v; gate/up) with base weights ``W_i [N_i, K]``, LoRA factors ``A_i [r_i, K]``,
``B_i [N_i, r_i]`` and scalings ``s_i`` -- one call computes every output::

    y = x·[W_1; …; W_n]ᵀ (+ bias)                  one GEMM (each 4-bit W_i dequantised into one scratch)
    xa = x·[A_1; …; A_n]ᵀ                          one GEMM (per member under dropout: own mask each)
    y[:, cols_i] += xa[:, rows_i]·(s_i·B_i)ᵀ       one small GEMM per member, in place

and the backward, from ``dY [M, N]``::

    g_i = dY_i·(s_i·B_i)    d(s_i·B_i) = dY_iᵀ·xa_i    d[A] = gᵀ·x    dX = dY·[W]  + g·[A]

LoRA-GA's frozen term of a member is two more rows of ``A`` and columns of ``B``: ``[A; A0]`` and
``[B, −B0]``, so ``W0 + s·(B·A − B0·A0)`` costs nothing extra. Saved for backward: x, xa and the
parameters themselves (no copies: the concatenated A is rebuilt from them); a 4-bit W is dequantised
again in backward, a dropout mask regenerated from its seed.

The gated MLP ``down(act(gate(x)) · up(x))`` (act = SiLU or GELU-tanh) is one op on top of these:
it saves x, the two pre-activations ``[e | u]`` and the small LoRA activations, and recomputes
``h = act(e)·u`` in backward (one elementwise kernel that also yields de and du), instead of keeping
``act(e)``, ``h`` and the LoRA inputs of ``down`` alive as a per-layer model does.

Everything is ``torch`` and cuBLAS except two elementwise Triton kernels (the activation forward and
backward) used on CUDA; on the CPU the same math runs in torch. The ops are eager: under
``torch.compile`` :mod:`fastlora.blocks` routes each projection through its own
:class:`~fastlora.LoraLinear` (whose op is a registered custom op) instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._dist import is_dtensor
from .layer import LoraLinear
from .ops import triton_available
from .ops.reference import BaseWeight, apply_dropout, autocast_off, base_weight_dense, dropout_mask, scaled_mm
from .quant import QuantizedWeight

__all__ = ["ACTIVATIONS", "GroupCall", "activation_kind", "gated_mlp", "grouped_linear", "member_call"]

# Activations of gated MLPs the fused op implements (names as in transformers' ACT2FN).
ACTIVATIONS = ("silu", "gelu_tanh")
_GELU_C = math.sqrt(2.0 / math.pi)


# ------------------------------------------------------------------------------------------------
# per-call bundle of the members' state
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupCall:
    """What one call of a grouped op needs besides the differentiable tensors (built per call).

    Attributes:
        bases: each member's W0 (dense, or a 4-bit :class:`QuantizedWeight`).
        bias: the members' biases concatenated (zeros for a member without one), or None.
        ncols: ``(start, stop)`` of each member's columns in the output.
        nrows: ``(start, stop)`` of each member's rows in the concatenated A (its rank, doubled with a
            frozen LoRA-GA term).
        dropout: each member's dropout probability in force (0 in eval mode).
        seeds: each member's dropout seed (ints; unused where the probability is 0).
        in_features: K.
        scalings: each member's LoRA scaling s_i.
        ranks: each member's trainable rank r_i (the first r_i rows of its block of A).
        frozen: each member's frozen LoRA-GA term ``(A0, B0)``, or None.
        views: the kernels' views of the 4-bit bases when one launch dequantises them all, else None.
    """

    bases: tuple[BaseWeight, ...]
    bias: torch.Tensor | None
    ncols: tuple[tuple[int, int], ...]
    nrows: tuple[tuple[int, int], ...]
    dropout: tuple[float, ...]
    seeds: tuple[int, ...]
    in_features: int
    scalings: tuple[float, ...]
    ranks: tuple[int, ...]
    frozen: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]
    views: tuple | None = None

    @property
    def out_features(self) -> int:
        return self.ncols[-1][1]

    @property
    def rank(self) -> int:
        """R: rows of the concatenated A."""
        return self.nrows[-1][1]

    @property
    def any_dropout(self) -> bool:
        return any(p > 0.0 for p in self.dropout)


def _seed(device: torch.device) -> int:
    # Drawn from torch's RNG exactly as LoraLinear draws its own (same generator, same order of
    # members), so a grouped model and a per-layer model seeded alike drop the same elements on the
    # CPU. On CUDA the seed comes from the CPU generator: read on the host without a sync.
    gen_device = device if device.type == "cpu" else torch.device("cpu")
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=gen_device))


def member_call(members: Sequence[LoraLinear], dtype: torch.dtype, device: torch.device) -> tuple[GroupCall, list]:
    """``(call, [A_1, B_1, …, A_n, B_n])``: the members' state and their LoRA parameters as they are
    (fp32 by default). The ops cast, scale and concatenate them inside (:func:`factors`), so no cast,
    scale or concatenation node enters the autograd graph (each is host time in forward and backward,
    per member and step); gradients reach every member's own ``lora_A`` and ``lora_B``."""
    params, biases, ncols, nrows, ps, seeds, bases, frozen = [], [], [], [], [], [], [], []
    n0 = r0 = 0
    for m in members:
        params += [m.lora_A, m.lora_B]
        has_frozen = m.lora_A0 is not None and not m.offset_in_base
        frozen.append((m.lora_A0, m.lora_B0) if has_frozen else None)
        rank = m.r * (2 if has_frozen else 1)
        base = m.base_weight()
        bases.append(base.to(dtype) if isinstance(base, torch.Tensor) else base)
        biases.append(m.base_layer.bias)
        ncols.append((n0, n0 + m.out_features))
        nrows.append((r0, r0 + rank))
        n0, r0 = n0 + m.out_features, r0 + rank
        p = m.dropout if m.training else 0.0
        ps.append(p)
        seeds.append(_seed(device) if p > 0.0 else 0)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                (b if b is not None else torch.zeros(m.out_features, device=device)).to(dtype)
                for b, m in zip(biases, members)
            ]
        )
    call = GroupCall(
        tuple(bases), bias, tuple(ncols), tuple(nrows), tuple(ps), tuple(seeds), members[0].in_features,
        tuple(float(m.scaling) for m in members), tuple(m.r for m in members), tuple(frozen),
        _group_views(bases, device),
    )  # fmt: skip
    return call, params


def factors(call: GroupCall, params: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    """``(A_cat [R, K], [B_i])`` from the members' parameters (no autograd): a frozen LoRA-GA term adds
    rows ``A0`` to the member's block of A and columns ``−B0`` to its B.

    A_cat is in ``dtype`` (one ``cat`` that also casts). The B_i are the parameters themselves
    (detached; a new tensor only with a frozen term), unscaled and in their own dtype: each reader
    applies ``s_i`` and the cast where it reads them -- a multiply into the scratch weight, or the
    GEMM's alpha -- so nothing B-sized is computed or kept for backward per call.
    """
    a_list, bs = [], []
    for i, fz in enumerate(call.frozen):
        a, b = params[2 * i].detach(), params[2 * i + 1].detach()
        if fz is not None:
            a = torch.cat([a, fz[0].to(a.dtype)], dim=0)
            b = torch.cat([b, -fz[1].to(b.dtype)], dim=1)
        a_list.append(a)
        bs.append(b)
    if len(a_list) == 1:
        a_cat = a_list[0].to(dtype)
    else:
        out = torch.empty((call.rank, call.in_features), dtype=dtype, device=a_list[0].device)
        a_cat = torch.cat(a_list, dim=0, out=out)
    return a_cat, bs


def param_grads(call: GroupCall, da: torch.Tensor | None, dbs: Sequence[torch.Tensor | None], needs) -> list:
    """``[dA_1, dB_1, …]`` (None where not needed) from the concatenated A's gradient (each member's
    trainable rows) and the members' dB."""
    out = []
    for i, ((r0, _), r) in enumerate(zip(call.nrows, call.ranks)):
        out.append(da[r0 : r0 + r] if da is not None and needs[2 * i] else None)
        out.append(dbs[i] if needs[2 * i + 1] else None)
    return out


# ------------------------------------------------------------------------------------------------
# base weights
# ------------------------------------------------------------------------------------------------
def _use_kernel(device: torch.device) -> bool:
    """Dequantise with the Triton kernel? (on CUDA; the CPU uses :func:`fastlora.quant.dequantize`)"""
    return device.type == "cuda"


def _group_views(bases: Sequence[BaseWeight], device: torch.device) -> tuple | None:
    """The kernels' views of the group's 4-bit weights when one launch can dequantise them all (CUDA,
    2-3 weights of one quantisation), else None."""
    if not (_use_kernel(device) and 2 <= len(bases) <= 3 and triton_available()):
        return None
    if not all(isinstance(b, QuantizedWeight) for b in bases):
        return None
    from .kernels import groupable  # importable: triton_available() imported the fused op
    from .ops.fused import packed_weight

    views = tuple(packed_weight(b) for b in bases)
    return views if groupable(views) else None


def _fill(base: BaseWeight, out: torch.Tensor) -> None:
    """W0 ``[n, K]`` into the first ``K`` columns of ``out`` (``[n, ≥K]``, unit column stride): a 4-bit
    W0 on CUDA by the single-layer op's Triton dequantisation, else by :func:`base_weight_dense`."""
    if isinstance(base, QuantizedWeight) and _use_kernel(out.device) and triton_available():
        from .kernels import dequant_packed  # importable: triton_available() imported the fused op
        from .ops.fused import packed_weight

        dequant_packed(packed_weight(base), out.dtype, out)
        return
    out[:, : base.shape[1]].copy_(base_weight_dense(base, out.dtype))


def _round8(v: int) -> int:
    return (v + 7) // 8 * 8


def _single_dense(call: GroupCall) -> bool:
    return len(call.bases) == 1 and isinstance(call.bases[0], torch.Tensor)


def scratch_weight(call: GroupCall, bs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
                   with_b: bool) -> torch.Tensor:  # fmt: skip
    """The members' W0 stacked in one scratch ``[N, K]`` (4-bit weights dequantised into it), or with
    ``with_b`` ``[N, K + R']``: ``[W0 | blockdiag(s_i·B_i) | 0]`` from the unscaled ``bs`` (R' pads the
    width to a multiple of 8), the layout in which one GEMM yields both a base product and the LoRA
    term. From torch's caching allocator: the same block is reused call after call."""
    k, n = call.in_features, call.out_features
    width = _round8(k + call.rank) if with_b else k
    w = torch.empty((n, width), dtype=dtype, device=device)
    if call.views is not None:
        from .kernels import dequant_group  # importable: _group_views found the Triton kernels

        dequant_group(call.views, dtype, w)
    else:
        for base, (n0, n1) in zip(call.bases, call.ncols):
            _fill(base, w[n0:n1])
    if with_b:
        w[:, k:].zero_()
        for (n0, n1), (r0, r1), b, s in zip(call.ncols, call.nrows, bs, call.scalings):
            torch.mul(b, s, out=w[n0:n1, k + r0 : k + r1])  # scaled and cast in one pass
    return w


# ------------------------------------------------------------------------------------------------
# the grouped projection (plain functions on 2-D tensors; autograd below)
# ------------------------------------------------------------------------------------------------
# Whether a forward whose x is narrower than its output folds the LoRA term into the base GEMM (see
# _forward). The benchmark flips it to compare the two (bench/bench_block.py).
FOLD_FORWARD = True


def _forward(x, call: GroupCall, a_cat, bs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [M, N], xa [M, R], x to save)``.

    Where x is narrower than the output (q/k/v, gate/up) and :data:`FOLD_FORWARD` is set (the
    default) the LoRA term rides in the base GEMM:
    ``y = [x | xa | 0]·[W0 | blockdiag(s·B) | 0]ᵀ`` -- a copy of x instead of a read and write of y
    per member; the concatenated activation is what backward keeps (x is a view of it), so it costs no
    memory beyond x and xa. Otherwise y = x·W0ᵀ and each member's term is added in place.
    """
    m, k = x.shape
    if call.any_dropout:
        xa = torch.cat(
            [apply_dropout(x, p, s) @ a_cat[r0:r1].t() for (r0, r1), p, s in zip(call.nrows, call.dropout, call.seeds)],
            dim=1,
        )
    else:
        xa = torch.mm(x, a_cat.t())
    if FOLD_FORWARD and not _single_dense(call) and k < call.out_features:
        w = scratch_weight(call, bs, x.dtype, x.device, with_b=True)
        r = call.rank
        xcat = torch.empty((m, w.shape[1]), dtype=x.dtype, device=x.device)
        xcat[:, :k].copy_(x)
        xcat[:, k : k + r].copy_(xa)
        xcat[:, k + r :].zero_()
        y = torch.addmm(call.bias, xcat, w.t()) if call.bias is not None else torch.mm(xcat, w.t())
        return y, xa, xcat[:, :k]
    w = call.bases[0] if _single_dense(call) else scratch_weight(call, bs, x.dtype, x.device, with_b=False)
    y = torch.addmm(call.bias, x, w.t()) if call.bias is not None else torch.mm(x, w.t())
    del w
    if len(bs) == 1:
        y.addmm_(xa, bs[0].to(y.dtype).t(), alpha=call.scalings[0])
    else:
        for (n0, n1), (r0, r1), b, s in zip(call.ncols, call.nrows, bs, call.scalings):
            y[:, n0:n1].addmm_(xa[:, r0:r1], b.to(y.dtype).t(), alpha=s)
    return y, xa, x


def _backward(
    dy, x, xa, call: GroupCall, a_cat, bs, need_dx: bool, need_a: bool, need_b: Sequence[bool], grad_dtype=None
):
    """``(dx, d a_cat, [dB_i], g)`` (None where not needed; ``g = [dY_i·(s_i·B_i)]``) for 2-D ``dy``;
    ``dB_i = s_i·dY_iᵀ·xa_i`` is the gradient of member i's trainable ``B`` (its first r_i columns).
    d a_cat and dB_i in ``grad_dtype`` (the parameters' dtype; default: dy's), see :func:`scaled_mm`.

    ``x`` may be None when ``need_a`` is False. With a materialised W0 scratch, dX's base product and g
    come from one GEMM over dY: ``dY·[W0 | blockdiag(s·B)]``.
    """
    k = call.in_features
    cols = [slice(n0, n1) for n0, n1 in call.ncols]
    rows = [slice(r0, r1) for r0, r1 in call.nrows]
    dx = None
    if need_dx and not _single_dense(call):
        w = scratch_weight(call, bs, dy.dtype, dy.device, with_b=True)
        out = torch.mm(dy, w)
        del w
        # g is copied out (small): dx's in-place update below must not overlap the memory it reads.
        dx, g = out[:, :k], out[:, k : k + call.rank].contiguous()
    else:
        gs = [scaled_mm(dy[:, c], b.to(dy.dtype), s) for c, b, s in zip(cols, bs, call.scalings)]
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        if need_dx:
            dx = torch.mm(dy, call.bases[0])
    # The scaling is the GEMM's alpha (beta = 0 ignores the empty input): dB_i in one cuBLAS call.
    dbs = [
        scaled_mm(dy[:, c].t(), xa[:, r.start : r.start + ri], s, grad_dtype) if nb else None
        for c, r, ri, s, nb in zip(cols, rows, call.ranks, call.scalings, need_b)
    ]
    da = None
    if need_a:
        if call.any_dropout:
            da = torch.cat(
                [
                    scaled_mm(g[:, r].t(), apply_dropout(x, p, s), 1.0, grad_dtype)
                    for r, p, s in zip(rows, call.dropout, call.seeds)
                ]
            )
        else:
            da = scaled_mm(g.t(), x, 1.0, grad_dtype)
    if need_dx:
        if call.any_dropout:
            for r, p, s in zip(rows, call.dropout, call.seeds):
                lora = g[:, r] @ a_cat[r]
                dx.add_(lora * dropout_mask(dx.shape, p, s, dx.device) if p > 0.0 else lora)
        else:
            dx.addmm_(g, a_cat)
    return dx, da, dbs, g


class _Grouped(torch.autograd.Function):
    """The grouped projection: inputs ``x [M, K]``, the call and the members' raw ``A_i, B_i``."""

    @staticmethod
    def forward(ctx, x, call, *params):
        with autocast_off(x.device.type):
            a_cat, bs = factors(call, params, x.dtype)
            y, xa, x_saved = _forward(x, call, a_cat, bs)
        # The parameters themselves are saved (no copies; autograd's version check catches one changed
        # in place before backward) and the factors rebuilt from them in backward: one cast-and-cat
        # launch per group, where keeping the bf16 A_cat would hold R·K elements per group until then.
        ctx.save_for_backward(x_saved, xa, *params)
        ctx.call, ctx.dtype = call, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        pneeds = needs[2:]
        need_b = pneeds[1::2]
        with autocast_off(dy.device.type):
            a_cat, bs = factors(ctx.call, params, ctx.dtype)
            dx, da, dbs, _ = _backward(
                dy.contiguous(), x, xa, ctx.call, a_cat, bs, needs[0], any(pneeds[0::2]), need_b, params[0].dtype
            )
        return dx, None, *param_grads(ctx.call, da, dbs, pneeds)


def grouped_linear(x: torch.Tensor, members: Sequence[LoraLinear]) -> list[torch.Tensor]:
    """Every member's output for one input ``x``, as one autograd op.

    Equal to ``[m(x) for m in members]`` (same dtype rules as :class:`~fastlora.LoraLinear`).
    """
    dtype = members[0]._compute_dtype(x)
    k = x.shape[-1]
    call, params = member_call(members, dtype, x.device)
    y = _Grouped.apply(x.reshape(-1, k).to(dtype), call, *params)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    # Each output gets its own storage (one copy, ~1 % of the op's time): as column views of y, the one
    # an attention keeps for backward (v) would keep all of y alive, q and k included.
    return [t.contiguous() for t in y.split([n1 - n0 for n0, n1 in call.ncols], dim=-1)]


# ------------------------------------------------------------------------------------------------
# activations: h = act(e)·u and its backward
# ------------------------------------------------------------------------------------------------
def activation_kind(act: object) -> str | None:
    """``"silu"`` or ``"gelu_tanh"`` when the callable ``act`` computes that function (checked on a
    probe, so any module or function equal to it qualifies), else None."""
    if not callable(act):
        return None
    t = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
    try:
        with torch.no_grad():
            out = act(t)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != t.shape:
        return None
    for kind in ACTIVATIONS:
        if torch.allclose(out.float(), _act_torch(t, kind)[0], rtol=1e-5, atol=1e-6):
            return kind
    return None


def _act_torch(e: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(e), act'(e))`` in fp32."""
    e = e.float()
    if kind == "silu":
        sig = torch.sigmoid(e)
        return e * sig, sig * (1.0 + e * (1.0 - sig))
    inner = _GELU_C * (e + 0.044715 * e * e * e)
    t = torch.tanh(inner)
    return 0.5 * e * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * e * e)


try:  # the Triton kernels are optional: CPU-only installs use the torch formulas above
    import triton
    import triton.language as tl

    @triton.jit
    def _act(e, KIND: tl.constexpr):
        """(act(e), act'(e)) in fp32: KIND 0 = SiLU, 1 = GELU-tanh (tanh written via exp)."""
        if KIND == 0:
            sig = 1.0 / (1.0 + tl.exp(-e))
            a = e * sig
            da = sig * (1.0 + e * (1.0 - sig))
        else:
            inner = 0.7978845608028654 * (e + 0.044715 * e * e * e)
            t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
            a = 0.5 * e * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * e * e)
        return a, da

    @triton.jit
    def _load_eu(eu_ptr, total, F, BLOCK: tl.constexpr):
        """This program's flat indices into [M, F] and its e, u (fp32) from the contiguous [M, 2F]."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        row = offs // F
        col = offs - row * F
        e = tl.load(eu_ptr + row * 2 * F + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(eu_ptr + row * 2 * F + F + col, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, row, col, e, u

    @triton.jit
    def _act_mul_fwd_kernel(eu_ptr, h_ptr, total, F, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask, _, _, e, u = _load_eu(eu_ptr, total, F, BLOCK)
        a, _ = _act(e, KIND)
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_mul_bwd_kernel(dh_ptr, eu_ptr, deu_ptr, total, F, stride_dh, KIND: tl.constexpr, BLOCK: tl.constexpr):
        # Reads dh, e, u; writes de, du into deu and h = act(e)·u over dh (dh is not needed after).
        # dh may be the first F columns of a wider buffer (row stride stride_dh).
        _, mask, row, col, e, u = _load_eu(eu_ptr, total, F, BLOCK)
        dh_offs = row * stride_dh + col
        dh = tl.load(dh_ptr + dh_offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act(e, KIND)
        ty = deu_ptr.dtype.element_ty
        tl.store(deu_ptr + row * 2 * F + col, (dh * u * da).to(ty), mask=mask)
        tl.store(deu_ptr + row * 2 * F + F + col, (dh * a).to(ty), mask=mask)
        tl.store(dh_ptr + dh_offs, (a * u).to(ty), mask=mask)

    _TRITON = True
except ImportError:
    _TRITON = False

_BLOCK = 1024


def _use_triton(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda


def act_mul(eu: torch.Tensor, kind: str, use_triton: bool | None = None) -> torch.Tensor:
    """``h = act(e)·u`` for ``eu = [e | u]`` ``[M, 2F]`` (contiguous), fp32 math, one rounding."""
    m, f = eu.shape[0], eu.shape[1] // 2
    if use_triton if use_triton is not None else _use_triton(eu):
        h = torch.empty((m, f), dtype=eu.dtype, device=eu.device)
        total = m * f
        _act_mul_fwd_kernel[(triton.cdiv(total, _BLOCK),)](eu, h, total, f, KIND=ACTIVATIONS.index(kind), BLOCK=_BLOCK)
        return h
    a, _ = _act_torch(eu[:, :f], kind)
    return (a * eu[:, f:].float()).to(eu.dtype)


def act_mul_backward(
    dh: torch.Tensor, eu: torch.Tensor, kind: str, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, [de | du])`` from ``dh [M, F]`` (unit column stride) and ``eu [M, 2F]`` (contiguous);
    ``h`` is written over ``dh``."""
    m, f = eu.shape[0], eu.shape[1] // 2
    deu = torch.empty_like(eu)
    if use_triton if use_triton is not None else _use_triton(eu):
        total = m * f
        _act_mul_bwd_kernel[(triton.cdiv(total, _BLOCK),)](
            dh, eu, deu, total, f, dh.stride(0), KIND=ACTIVATIONS.index(kind), BLOCK=_BLOCK
        )
        return dh, deu
    a, da = _act_torch(eu[:, :f], kind)
    u = eu[:, f:].float()
    dh32 = dh.float()
    deu[:, :f] = dh32 * u * da
    deu[:, f:] = dh32 * a
    dh.copy_(a * u)
    return dh, deu


# ------------------------------------------------------------------------------------------------
# the gated MLP
# ------------------------------------------------------------------------------------------------
class _GatedMLP(torch.autograd.Function):
    """The gated MLP: inputs ``x [M, K]``, the activation, both calls and the raw ``A_i, B_i`` of the
    gate/up members, then of down."""

    @staticmethod
    def forward(ctx, x, kind, call_gu, call_d, *params):
        n_gu = 2 * len(call_gu.scalings)
        with autocast_off(x.device.type):
            a_gu, bs_gu = factors(call_gu, params[:n_gu], x.dtype)
            a_d, bs_d = factors(call_d, params[n_gu:], x.dtype)
            eu, xa_gu, x_saved = _forward(x, call_gu, a_gu, bs_gu)
            h = act_mul(eu, kind)
            out, ha, _ = _forward(h, call_d, a_d, bs_d)
            del h  # recomputed in backward: only x, [e | u] and the rank-sized activations are kept
        ctx.save_for_backward(x_saved, eu, xa_gu, ha, *params)  # the parameters: see _Grouped
        ctx.kind, ctx.call_gu, ctx.call_d, ctx.dtype = kind, call_gu, call_d, x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, eu, xa_gu, ha, *params = ctx.saved_tensors
        call_gu, call_d = ctx.call_gu, ctx.call_d
        n_gu = 2 * len(call_gu.scalings)
        needs = ctx.needs_input_grad
        needs_gu, needs_d = needs[4 : 4 + n_gu], needs[4 + n_gu :]
        with autocast_off(dout.device.type):
            a_gu, bs_gu = factors(call_gu, params[:n_gu], ctx.dtype)
            a_d, bs_d = factors(call_d, params[n_gu:], ctx.dtype)
            # down: dh (and g = dout·s·B) first; h = act(e)·u is recomputed by the activation
            # backward, which writes it over dh, then gives dA of down.
            gd = params[0].dtype
            dh, _, dbs_d, g = _backward(dout.contiguous(), None, ha, call_d, a_d, bs_d, True, False, needs_d[1::2], gd)
            h, deu = act_mul_backward(dh, eu, ctx.kind)
            da_d = None
            if needs_d[0]:
                p, seed = call_d.dropout[0], call_d.seeds[0]
                da_d = scaled_mm(g[:, : call_d.ranks[0]].t(), apply_dropout(h, p, seed), 1.0, gd)
            del h, dh
            dx, da_gu, dbs_gu, _ = _backward(
                deu, x, xa_gu, call_gu, a_gu, bs_gu, needs[0], any(needs_gu[0::2]), needs_gu[1::2], gd
            )
        return (
            dx,
            None,
            None,
            None,
            *param_grads(call_gu, da_gu, dbs_gu, needs_gu),
            *param_grads(call_d, da_d, dbs_d, needs_d),
        )


def gated_mlp(x: torch.Tensor, gate_up: Sequence[LoraLinear], down: LoraLinear, kind: str) -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` as one autograd op.

    ``gate_up`` is ``[gate, up]`` (Llama-style) or ``[gate_up]`` (Phi-3: one projection whose first
    half of outputs is the gate); ``kind`` is one of :data:`ACTIVATIONS`.
    """
    dtype = gate_up[0]._compute_dtype(x)
    k = x.shape[-1]
    call_gu, params_gu = member_call(gate_up, dtype, x.device)
    call_d, params_d = member_call([down], dtype, x.device)
    out = _GatedMLP.apply(x.reshape(-1, k).to(dtype), kind, call_gu, call_d, *params_gu, *params_d)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def grouping_blocker(members: Sequence[LoraLinear]) -> str | None:
    """Why these members cannot run grouped right now (None when they can): FSDP2-sharded weights
    outside the model's forward, or a trainable bias (the grouped op has no bias gradient)."""
    for m in members:
        if is_dtensor(m.base_layer.weight) or is_dtensor(m.lora_A):
            return f"{m.name}: sharded weights (FSDP2 outside a gathered forward)"
        bias = m.base_layer.bias
        if bias is not None and bias.requires_grad:
            return f"{m.name}: a trainable bias"
    return None
