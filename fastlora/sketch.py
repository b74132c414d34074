"""Sketched gradient estimation: LoRA-GA's top singular vectors in O((m+n)·k) memory per layer.

LoRA-GA needs only the top ``2r`` singular triplets of each layer's averaged gradient
``G = (1/N)·Σ dYᵀ·x`` (``m × n``, out × in), yet the dense estimate holds all of ``G`` in fp32
(26 GiB for a 7B model). Because every batch's contribution is a product, a randomized *linear*
sketch of ``G`` can be accumulated batch by batch without ever forming it:

    range sketch     Y = G·Ω = Σ dYᵀ·(x·Ω)        m × k     (Ω: n × k random)
    co-range sketch  W = Ψ·G = Σ (Ψ·dYᵀ)·x        l × n     (Ψ: l × m random)

Per batch this costs ``O(tokens·(m+n)·(k+l))`` instead of ``O(tokens·m·n)``, and the memory is
``m·k + l·n`` floats instead of ``m·n``. Ω and Ψ come from a shared seed, so they are identical on
every rank and the sketches all-reduce exactly like the dense sums (a sketch is linear in G).

**Reconstruction** (Tropp, Yurtsever, Udell, Cevher 2017, "Practical sketching algorithms for
low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 38(4), Alg. 3 with the fixed-rank
truncation of §5): ``Q = orth(Y)``; solve the small least-squares problem ``(Ψ·Q)·X = W`` for
``X`` (``k × n``); then ``G ≈ Q·X`` and the SVD of the small ``X = Ũ·S·Vᵀ`` gives ``U = Q·Ũ``,
``S``, ``V``. The paper's error bound (Thm. 4.3) is ``(1 + f(k, l))·(1 + f(ρ, k))·τ²_{ρ+1}(G)``
with ``f(s, t) = s / (t − s − 1)`` and ``τ_{ρ+1}`` the tail energy past rank ρ; we use its
recommended co-range size ``l = 2k + 1``, which makes ``f(k, l) = 1`` (the co-range sketch then costs
at most a factor 2 in expected error over an exact projection onto ``range(Y)``).

**Orientation.** The co-range sketch is the larger one (``l ≈ 2k``), so it is put on the smaller
side: a layer with ``n > m`` (e.g. ``down_proj``) is sketched as ``Gᵀ = Σ xᵀ·dY``, which swaps the
roles of ``x`` and ``dY``. Memory per layer is then ``k·max(m, n) + l·min(m, n)``.

**Two passes** (``passes=2``): when the spectrum decays slowly, a second pass over the same batches
computes ``Y₂ = G·P`` exactly, with ``P = orth(Wᵀ)`` (``n × l``) the row-space basis found by the
first pass's co-range sketch. That is the two-pass randomized SVD of Halko, Martinsson, Tropp
(2011, Alg. 5.1) applied to ``Gᵀ`` with ``l`` columns: ``G ≈ G·P·Pᵀ`` with an exact (not a
least-squares) projection, and ``range(Y₂) = range(G·Gᵀ·Ψᵀ)``: one power (subspace) iteration for
the left singular vectors. The SVD of the ``m × l`` matrix ``Y₂ = Û·S·V̂ᵀ`` gives ``U = Û`` and
``V = P·V̂``.

**Precision.** Sums are fp32 (fp64 for an fp64 model). The test matrices are Gaussian values
rounded to bfloat16 (tiny ones flushed to zero), so they are exact in bf16, fp16 and fp32 alike:
the products use the very matrices the reconstruction uses, whatever the activation dtype. A
product of a half-precision activation with an fp32 operand (``x·Ω`` before it multiplies ``dY``)
splits the fp32 operand into a bf16 high and low part (two tensor-core GEMMs with fp32 output),
which keeps ~16 mantissa bits instead of bf16's 8 without upcasting the (large) activations.

The sketch runs in the same hooks as the dense estimate (:mod:`fastlora.estimate`), as a handful of
skinny GEMMs per layer and batch; it is not fused into the Triton LoRA kernels.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .estimate import (
    GradientAccumulator,
    LossFn,
    _default_targets,
    _dist_world,
    _mm_out_dtype_ok,
    _module_device,
    _weight_dtype,
    estimate_gradient,
)
from .layer import LoraLinear, base_features
from .offload import BlockOffloader
from .patching import TargetSpec

__all__ = [
    "LowRankGradient",
    "RangeAccumulator",
    "SketchAccumulator",
    "SketchedGradient",
    "auto_sketch_size",
    "estimate_sketched",
    "reconstruct",
    "test_matrix",
]

_WIDE = (torch.float32, torch.float64)

# "auto": k = 2r + max(AUTO_MIN_OVERSAMPLE, ceil(AUTO_OVERSAMPLE_FRACTION · 2r)), chosen from the
# measurements of bench/sketch_accuracy.py (bench/NOTES.md, "Sketched LoRA-GA").
AUTO_OVERSAMPLE_FRACTION = 1.0
AUTO_MIN_OVERSAMPLE = 16


def auto_sketch_size(r: int) -> int:
    """The default range-sketch width ``k`` for LoRA rank ``r`` (LoRA-GA needs the top ``2r``).

    ``k = 2r + max(16, 2r)``, i.e. ``4r`` from r = 8 on; the co-range sketch is ``l = 2k + 1``.
    See bench/NOTES.md ("Sketched LoRA-GA") for the measurements behind it.
    """
    if r < 1:
        raise ValueError(f"fastlora: r must be >= 1, got {r}")
    return 2 * r + max(AUTO_MIN_OVERSAMPLE, math.ceil(AUTO_OVERSAMPLE_FRACTION * 2 * r))


class LowRankGradient(NamedTuple):
    """A layer's averaged gradient in factored form, ``G ≈ U·diag(S)·Vh`` (``[out, in]``).

    ``U [out, q]`` and ``Vh [q, in]`` have orthonormal columns/rows, ``S [q]`` descends; ``q`` is
    the sketch width (the top ``2r`` are what LoRA-GA uses; the trailing ones are less accurate).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``, the shape of the dense gradient this stands for."""
        return (self.U.shape[0], self.Vh.shape[1])

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def is_cuda(self) -> bool:
        return self.U.is_cuda

    def dense(self) -> torch.Tensor:
        """``U·diag(S)·Vh`` (materialises ``[out, in]``: for small layers and tests)."""
        return (self.U * self.S) @ self.Vh

    def to(self, device: torch.device | str) -> LowRankGradient:
        return LowRankGradient(self.U.to(device), self.S.to(device), self.Vh.to(device))


class SketchedGradient(Mapping[str, LowRankGradient]):
    """The result of a sketched estimate: ``module name -> LowRankGradient``.

    Accepted by ``fastlora.patch(method="lora_ga", grads=...)`` like a dense
    :class:`~fastlora.GradientEstimate`.

    Attributes:
        num_batches: batches averaged (over all ranks when distributed).
        passes: 1 (single-pass reconstruction) or 2 (second pass over the data).
        sizes: ``{name: (k, l)}``, the range and co-range sketch widths used per layer.
    """

    def __init__(
        self, factors: dict[str, LowRankGradient], num_batches: int, passes: int, sizes: dict[str, tuple[int, int]]
    ) -> None:
        self._factors = dict(factors)
        self.num_batches = int(num_batches)
        self.passes = passes
        self.sizes = dict(sizes)

    def __getitem__(self, name: str) -> LowRankGradient:
        return self._factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        return f"SketchedGradient({len(self)} layers, {self.num_batches} batches, passes={self.passes})"

    def to(self, device: torch.device | str) -> SketchedGradient:
        """A copy with every factor on ``device``."""
        return SketchedGradient(
            {k: v.to(device) for k, v in self._factors.items()}, self.num_batches, self.passes, self.sizes
        )


# -- test matrices and products ----------------------------------------------------------------------------


def test_matrix(seed: int, role: str, rows: int, cols: int) -> torch.Tensor:
    """The fp32 random test matrix ``role`` of shape ``[rows, cols]``, a pure function of its arguments.

    Generated on the CPU from a generator seeded by a CRC of ``(seed, role, rows, cols)`` -- not by
    Python's ``hash``, which is salted per process -- so every rank and every device gets the same
    matrix. Gaussian entries rounded to bfloat16, with magnitudes below 2⁻¹⁴ flushed to zero (those
    are not normal fp16 numbers): every entry is then exact in bf16, fp16, fp32 and fp64.
    """
    key = zlib.crc32(f"fastlora-sketch:{seed}:{role}:{rows}:{cols}".encode())
    gen = torch.Generator().manual_seed(key)
    g = torch.randn(rows, cols, generator=gen).bfloat16().float()
    return g.masked_fill_(g.abs() < 2.0**-14, 0.0)


def _split_hi_lo(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(dtype)
    return hi, (t - hi.to(t.dtype)).to(dtype)


def mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 (fp64 if either is fp64) result, never rounding an operand to less
    than its own precision.

    Two half-precision operands: a GEMM with fp32 output where the backend has one. One
    half-precision and one wide operand: the wide one is split into a high and a low half-precision
    part (``t ≈ hi + lo`` to ~16 mantissa bits), both multiplied in one GEMM with fp32 output, so the
    large activation is never upcast. Elsewhere (CPU half precision), both are upcast.
    """
    if a.dtype in _WIDE and b.dtype in _WIDE:
        dt = torch.promote_types(a.dtype, b.dtype)
        return a.to(dt) @ b.to(dt)
    if a.dtype == b.dtype:
        if _mm_out_dtype_ok(a.device, a.dtype):
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    half = b.dtype if a.dtype in _WIDE else a.dtype
    if a.dtype not in _WIDE and b.dtype not in _WIDE:  # two different half types
        return a.float() @ b.float()
    if torch.float64 in (a.dtype, b.dtype) or not _mm_out_dtype_ok(a.device, half):
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dt) @ b.to(dt)
    if a.dtype in _WIDE:
        hi, lo = _split_hi_lo(a, half)
        out = torch.mm(torch.cat([hi, lo], 0), b, out_dtype=torch.float32)
        return out[: a.shape[0]] + out[a.shape[0] :]
    hi, lo = _split_hi_lo(b, half)
    out = torch.mm(a, torch.cat([hi, lo], 1), out_dtype=torch.float32)
    return out[:, : b.shape[1]] + out[:, b.shape[1] :]


def reconstruct(Y: torch.Tensor, W: torch.Tensor, Psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-pass low-rank SVD of ``A`` from ``Y = A·Ω`` and ``W = Ψ·A`` (Tropp et al. 2017, Alg. 3).

    ``Q = orth(Y)``, ``X = argmin ‖(Ψ·Q)·X − W‖`` (via a QR of the small ``l × k`` matrix ``Ψ·Q``),
    ``X = Ũ·S·Vh`` → ``A ≈ (Q·Ũ)·diag(S)·Vh``. Computed in fp64 (the matrices are small).

    Args:
        Y: ``[M, k]``. W: ``[l, N]``. Psi: ``[l, M]`` (``l >= k``).

    Returns:
        ``U [M, k]``, ``S [k]`` (descending), ``Vh [k, N]``, fp64.
    """
    Y, W, Psi = Y.double(), W.double(), Psi.double()
    Q = torch.linalg.qr(Y).Q
    Q2, R2 = torch.linalg.qr(Psi @ Q)
    X = torch.linalg.solve_triangular(R2, Q2.t() @ W, upper=True)
    Ut, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return Q @ Ut, S, Vh


# -- accumulators ----------------------------------------------------------------------------------------------


class _Layer:
    """One layer's sketch state. ``A = aᵀ·b`` is the sketched matrix: ``G`` (``a = dY``, ``b = x``)
    or, when ``transposed``, ``Gᵀ`` (``a = x``, ``b = dY``), so that ``M >= N``."""

    def __init__(self, m: int, n: int) -> None:
        self.transposed = n > m
        self.M, self.N = (n, m) if self.transposed else (m, n)
        self.sums: dict[str, torch.Tensor] = {}

    def operands(self, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x, dy) if self.transposed else (dy, x)

    def to_g(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Factors of ``A`` -> factors of ``G`` (``Aᵀ = Vhᵀ·S·Uᵀ`` when A is ``Gᵀ``)."""
        return (Vh.t(), S, U.t()) if self.transposed else (U, S, Vh)


def _acc_dtype(targets: Mapping[str, nn.Module]) -> torch.dtype:
    # As the dense path: an fp64 model (the exactness tests) is summed in fp64, anything else in fp32.
    return torch.float64 if {_weight_dtype(m) for m in targets.values()} == {torch.float64} else torch.float32


class _TestMatrices:
    """Shared test matrices, cast per (dtype, device) once; layers of equal size share them."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, rows, cols, dtype, device)
        if key not in self._cache:
            master = self._cache.setdefault((role, rows, cols), test_matrix(self.seed, role, rows, cols))
            self._cache[key] = master.to(device=device, dtype=dtype)
        return self._cache[key]


class SketchAccumulator(GradientAccumulator):
    """Range and co-range sketches ``Y = A·Ω``, ``W = Ψ·A`` of every layer's summed gradient.

    Args:
        shapes: ``{name: (out, in)}``.
        k: range-sketch width, an int for every layer or ``{name: k}``; clamped to ``min(out, in)``
            (at that width the sketch is exact).
        l: co-range width (default ``2k + 1``, Tropp et al. 2017), clamped to ``max(out, in)``.
        seed: seed of the test matrices (must be the same on every rank).
        devices: where each layer's sketches live (default: the CPU; pass the layers' devices).
        dtype: accumulation dtype (fp32; fp64 for exactness tests).
        reconstruct: whether :meth:`result` runs the reconstruction (the first of two passes only
            needs the co-range bases, :meth:`corange_bases`).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        k: int | Mapping[str, int],
        *,
        l: int | Mapping[str, int] | None = None,  # noqa: E741 (the paper's name)
        seed: int = 0,
        devices: Mapping[str, torch.device] | torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        reconstruct: bool = True,
    ) -> None:
        super().__init__(shapes)
        self.seed = seed
        self.dtype = dtype
        self.do_reconstruct = reconstruct
        self._tests = _TestMatrices(seed)
        self.layers: dict[str, _Layer] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        for name, (m, n) in self.shapes.items():
            kk = k[name] if isinstance(k, Mapping) else k
            if not isinstance(kk, int) or kk < 1:
                raise ValueError(f"fastlora: sketch width k must be a positive int, got {kk!r} for {name!r}")
            lay = _Layer(m, n)
            kk = min(kk, lay.N)
            ll = (l[name] if isinstance(l, Mapping) else l) if l is not None else 2 * kk + 1
            ll = min(max(ll, kk), lay.M)
            dev = devices.get(name) if isinstance(devices, Mapping) else devices
            lay.sums = {
                "Y": torch.zeros(lay.M, kk, dtype=dtype, device=dev),
                "W": torch.zeros(ll, lay.N, dtype=dtype, device=dev),
            }
            self.layers[name] = lay
            self.sizes[name] = (kk, ll)

    def test_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(Ω [N, k], Ψ [l, M], transposed)`` of layer ``name`` (fp32), ``A = Gᵀ`` if transposed."""
        lay, (k, k_co) = self.layers[name], self.sizes[name]
        omega, psi = test_matrix(self.seed, "omega", lay.N, k), test_matrix(self.seed, "psi", k_co, lay.M)
        return omega, psi, lay.transposed

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        lay, (k, k_co) = self.layers[name], self.sizes[name]
        a, b = lay.operands(x, dy)  # A = aᵀ·b,  a [T, M], b [T, N]
        omega = self._tests.get("omega", lay.N, k, b.dtype if b.dtype not in _WIDE else self.dtype, b.device)
        psi = self._tests.get("psi", k_co, lay.M, a.dtype if a.dtype not in _WIDE else self.dtype, a.device)
        Y, W = lay.sums["Y"], lay.sums["W"]
        y = mm_wide(a.t(), mm_wide(b, omega))  # aᵀ·(b·Ω)   [M, k]
        w = mm_wide(mm_wide(psi, a.t()), b)  # (Ψ·aᵀ)·b   [l, N]
        Y.add_(y.to(Y.device, Y.dtype))
        W.add_(w.to(W.device, W.dtype))
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}\0{part}": t for name, lay in self.layers.items() for part, t in lay.sums.items()}

    def _check_finite(self, num_batches: int) -> None:
        bad = [n for n, lay in self.layers.items() if not all(bool(torch.isfinite(t).all()) for t in lay.sums.values())]
        if bad:
            more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
            raise ValueError(
                f"fastlora.estimate_gradient: the gradient of layer {bad[0]!r}{more} has NaN/inf entries "
                f"(its sketch, over {num_batches} batches); check the loss and the data, or the scale of that "
                "layer's inputs"
            )

    def result(self, num_batches: int) -> dict[str, LowRankGradient]:
        """Per layer the factors of the averaged gradient (``{}`` when ``reconstruct=False``)."""
        self._check_finite(num_batches)
        if not self.do_reconstruct:
            return {}
        out = {}
        for name, lay in self.layers.items():
            _, psi, _ = self.test_matrices(name)
            Y, W = lay.sums["Y"], lay.sums["W"]
            U, S, Vh = reconstruct(Y, W, psi.to(Y.device))
            U, S, Vh = lay.to_g(U, S / num_batches, Vh)
            out[name] = LowRankGradient(*(t.to(self.dtype).contiguous() for t in (U, S, Vh)))
        return out

    def corange_bases(self) -> dict[str, torch.Tensor]:
        """``P = orth(Wᵀ)`` per layer (``[N, min(l, N)]``, fp32/fp64): the row-space basis of ``A``
        found by the co-range sketch, the test matrix of the second pass."""
        out = {}
        for name, lay in self.layers.items():
            W = lay.sums["W"]
            out[name] = torch.linalg.qr(W.double().t()).Q.to(self.dtype)
        return out

    def nbytes(self) -> int:
        """Bytes of the sketches (the test matrices, shared between layers of equal size, not counted)."""
        return sum(t.numel() * t.element_size() for lay in self.layers.values() for t in lay.sums.values())


class RangeAccumulator(GradientAccumulator):
    """The second pass: ``Y₂ = A·P`` per layer for given orthonormal ``P [N, q]`` (exact products;
    ``P`` is fp32 and multiplies half-precision activations as a hi/lo pair, see :func:`mm_wide`).

    ``result`` is the SVD of ``G·P·Pᵀ``, see the module docstring.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        bases: Mapping[str, torch.Tensor],
        *,
        devices: Mapping[str, torch.device] | torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(shapes)
        self.dtype = dtype
        self.layers: dict[str, _Layer] = {}
        self.bases: dict[str, torch.Tensor] = {}
        for name, (m, n) in self.shapes.items():
            lay = _Layer(m, n)
            P = bases[name]
            if P.shape[0] != lay.N:
                raise ValueError(f"fastlora: basis of {name!r} has {P.shape[0]} rows, expected {lay.N}")
            dev = devices.get(name) if isinstance(devices, Mapping) else devices
            lay.sums = {"Y": torch.zeros(lay.M, P.shape[1], dtype=dtype, device=dev)}
            self.layers[name] = lay
            self.bases[name] = P.to(device=dev, dtype=dtype)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        lay = self.layers[name]
        a, b = lay.operands(x, dy)
        P = self.bases[name]
        if P.device != b.device:
            P = self.bases[name] = P.to(b.device)
        Y = lay.sums["Y"]
        Y.add_(mm_wide(a.t(), mm_wide(b, P)).to(Y.device, Y.dtype))
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}\0Y": lay.sums["Y"] for name, lay in self.layers.items()}

    def result(self, num_batches: int) -> dict[str, LowRankGradient]:
        out = {}
        for name, lay in self.layers.items():
            Y = lay.sums["Y"]
            if not bool(torch.isfinite(Y).all()):
                raise ValueError(
                    f"fastlora.estimate_gradient: the gradient of layer {name!r} has NaN/inf entries "
                    f"(second sketch pass, over {num_batches} batches)"
                )
            Uh, S, Vt = torch.linalg.svd(Y.double(), full_matrices=False)
            V = self.bases[name].to(Y.device).double() @ Vt.t()
            U, S, Vh = lay.to_g(Uh, S / num_batches, V.t())
            out[name] = LowRankGradient(*(t.to(self.dtype).contiguous() for t in (U, S, Vh)))
        return out


# -- the driver ------------------------------------------------------------------------------------------------


def _resolve_k(sketch: int | str, targets: Mapping[str, nn.Module], for_lora_ga: bool = False) -> dict[str, int]:
    if for_lora_ga and isinstance(sketch, int) and not isinstance(sketch, bool):
        # Refuse before the (expensive) estimate rather than after it.
        for name, module in targets.items():
            if isinstance(module, LoraLinear) and sketch < 2 * module.r:
                raise ValueError(
                    f"fastlora.patch(method='lora_ga'): sketch={sketch} is narrower than the top 2r = {2 * module.r} "
                    f"singular vectors LoRA-GA needs (layer {name!r}); use sketch='auto' or an int >= 4r"
                )
    if sketch == "auto":
        ks = {}
        for name, module in targets.items():
            if not isinstance(module, LoraLinear):
                raise ValueError(
                    "fastlora.estimate_gradient: sketch='auto' sizes the sketch from each layer's LoRA rank; on an "
                    f"unpatched model ({name!r} is no LoraLinear) give an int (e.g. sketch=4*r)"
                )
            ks[name] = auto_sketch_size(module.r)
        return ks
    if isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1:
        raise ValueError(f"fastlora: sketch must be 'auto', a positive int or None; got {sketch!r}")
    return dict.fromkeys(targets, sketch)


def _broadcast(dist: Any, t: torch.Tensor) -> None:
    # NCCL needs device tensors.
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(tmp, src=0)
        t.copy_(tmp)
    else:
        dist.broadcast(t, src=0)


def estimate_sketched(
    model: nn.Module,
    data: Iterable[Any],
    *,
    sketch: int | str = "auto",
    passes: int = 1,
    seed: int = 0,
    iters: int = 64,
    loss_fn: LossFn | None = None,
    offload: str | BlockOffloader | None = None,
    progress: bool = True,
    target_modules: TargetSpec = "all-linear",
    exclude: TargetSpec = None,
    targets: Mapping[str, nn.Module] | None = None,
    device: torch.device | str | None = None,
    blocks: Sequence[nn.Module] | Sequence[str] | None = None,
    for_lora_ga: bool = False,
) -> SketchedGradient:
    """``fastlora.estimate_gradient(..., sketch=k)``: the top singular triplets of every target
    layer's averaged gradient, from randomized sketches, never materialising the gradient.

    Args:
        sketch: range-sketch width ``k`` per layer (int), or ``"auto"`` (:func:`auto_sketch_size` of
            each LoRA layer's rank; needs a patched model). The co-range width is ``2k + 1``.
        passes: 1 (single pass, the default) or 2 (a second pass over the same batches for one
            power iteration; ``data`` must then be re-iterable, e.g. a list or a DataLoader, and
            yield the same batches again).
        seed: seed of the test matrices (the same on every rank).
        for_lora_ga: refuse an int ``sketch`` below a LoRA layer's ``2r`` up front (the LoRA-GA init).
        The others: as :func:`fastlora.estimate_gradient` (``offload="cpu"`` changes nothing here:
        the sketches are small and stay beside their layers; ``"blocks"`` streams the model).

    Returns:
        A :class:`SketchedGradient`: ``{name: LowRankGradient(U, S, Vh)}`` of the averaged gradient,
        fp32 (fp64 for an fp64 model), summed over ranks when ``torch.distributed`` is initialised.
    """
    if passes not in (1, 2):
        raise ValueError(f"fastlora.estimate_gradient: passes must be 1 or 2, got {passes!r}")
    if passes == 2 and iter(data) is data:
        raise ValueError(
            "fastlora.estimate_gradient: passes=2 goes over the data twice; pass a re-iterable (a list, a DataLoader "
            "without shuffling), not an iterator or generator"
        )
    if targets is None:
        targets = _default_targets(model, target_modules, exclude)
    if not targets:
        raise ValueError("fastlora.estimate_gradient: no target layer (no linear layer matched target_modules)")
    shapes = {}
    for name, module in targets.items():
        n_in, n_out = base_features(module.base_layer if isinstance(module, LoraLinear) else module)
        shapes[name] = (n_out, n_in)
    ks = _resolve_k(sketch, targets, for_lora_ga)
    dtype = _acc_dtype(targets)
    if offload == "blocks" or isinstance(offload, BlockOffloader):
        # The layers' parameters live on the host between uses; x and dY arrive on the compute device.
        dev = offload.device if isinstance(offload, BlockOffloader) else torch.device(device or _default_device())
        devices: Mapping[str, torch.device] | torch.device = dev
    else:
        devices = {n: _module_device(m) for n, m in targets.items()}
    common = dict(
        iters=iters, loss_fn=loss_fn, offload=None if offload == "cpu" else offload, progress=progress,
        targets=targets, device=device, blocks=blocks,
    )  # fmt: skip

    acc = SketchAccumulator(shapes, ks, seed=seed, devices=devices, dtype=dtype, reconstruct=passes == 1)
    try:
        est = estimate_gradient(model, data, accumulator=acc, **common)
    finally:
        acc.close()
    if passes == 1:
        return SketchedGradient(dict(est.items()), est.num_batches, 1, acc.sizes)

    bases = acc.corange_bases()
    sizes = {n: (acc.sizes[n][0], bases[n].shape[1]) for n in shapes}
    dist = _dist_world()
    if dist is not None:  # every rank must multiply by the very same basis
        for P in bases.values():
            _broadcast(dist, P)
    del acc
    acc2 = RangeAccumulator(shapes, bases, devices=devices, dtype=dtype)
    try:
        est2 = estimate_gradient(model, data, accumulator=acc2, **common)
    finally:
        acc2.close()
    if est2.num_batches != est.num_batches:
        raise ValueError(
            f"fastlora.estimate_gradient: passes=2 saw {est.num_batches} batches in the first pass and "
            f"{est2.num_batches} in the second; the data must yield the same batches twice"
        )
    return SketchedGradient(dict(est2.items()), est2.num_batches, 2, sizes)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
