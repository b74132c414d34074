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

**A-posteriori error estimate** (Tropp et al. 2017, §6): ``q`` extra rows ``Φ`` of the co-range
test matrix (independent Gaussian probes, ``PROBES = 10``) give ``Z = Φ·A`` at the cost of ``q``
more rows of ``W``; since ``E‖Φ·E‖²_F = q·‖E‖²_F`` for any fixed ``E``, ``‖Z − Φ·Â‖²_F / q`` is an
unbiased estimate of the reconstruction's squared error ``‖A − Â‖²_F`` (and ``‖Z‖²_F / q`` of
``‖A‖²_F``). Divided by the energy of the leading triplets that matter (``Σ Ŝ²`` over the top
``2r`` for LoRA-GA) it says whether those triplets can be trusted: on every trained-model gradient
measured it is below 0.2, on the flat spectra of random-init models above 0.5
(bench/sketch_accuracy.py). It measures the tail's weight, not the accuracy of the later passes:
on a flat spectrum it stays large even for the exact top ``2r``.

**More passes** (``passes=N``): when the spectrum decays slowly, pass 2 computes ``Y₂ = A·P``
exactly, with ``P = orth(Wᵀ)`` (``N × (l + q)``) the row-space basis found by the first pass's
co-range sketch and probes: the two-pass randomized SVD of Halko, Martinsson, Tropp (2011,
Alg. 5.1) applied to ``Aᵀ``, an exact projection ``A ≈ A·P·Pᵀ`` whose SVD (of the small ``Y₂``)
gives the factors, with ``range(Y₂) = range(A·Aᵀ·Ψᵀ)``. Every further pass is one more step of
subspace iteration on the other side, same width: pass 3 computes ``Qᵀ·A`` with ``Q = orth(Y₂)``
(``A ≈ Q·Qᵀ·A``), pass 4 ``A·orth((Qᵀ·A)ᵀ)``, and so on (Halko et al. §4.5, one product per pass
over the data). The energy a projection keeps in its top ``2r``, ``Σ_{i≤2r} Sᵢ²``, is at most the
exact one and rises toward it pass by pass; how fast depends on ``σ_{q+1}/σ_{2r}``, which on the
flat spectra of a random-init 8B model on random tokens is close to 1 (two passes there lost 0.04
of first-step alignment, bench/NOTES.md).

``passes="auto"`` stops after the first pass when every layer's error estimate is at most
``AUTO_ERROR_THRESHOLD``; else it runs projection passes, and after each from the third on
compares the first-step alignment predicted from the captured energy,
:func:`predicted_alignment` ``= sqrt(Σ_layers Σ_{i≤2r} Sᵢ² / Σ_layers ‖G‖²_F)``, with the previous
pass's: it stops when the rise is at most ``AUTO_ALIGNMENT_TOLERANCE`` (0.01), or at
``max_passes`` (default ``AUTO_MAX_PASSES = 4``) with a warning when it had not settled.

**Precision.** Sums are fp32 (fp64 for an fp64 model). The test matrices are Gaussian values
rounded to bfloat16 (tiny ones flushed to zero), so they are exact in bf16, fp16 and fp32 alike:
the products use the very matrices the reconstruction uses, whatever the activation dtype. A
product of a half-precision activation with an fp32 operand (``x·Ω`` before it multiplies ``dY``)
splits the fp32 operand into a bf16 high and low part (two tensor-core GEMMs with fp32 output),
which keeps ~16 mantissa bits instead of bf16's 8 without upcasting the (large) activations.

The sketch runs in the same hooks as the dense estimate (:mod:`fastlora.lora_ga.estimate`), as a handful of
skinny GEMMs per layer and batch; it is not fused into the Triton LoRA kernels.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..layer import LoraLinear
from .accumulators import GradientAccumulator
from .products import mm_wide

__all__ = [
    "AUTO_ALIGNMENT_TOLERANCE",
    "AUTO_ERROR_THRESHOLD",
    "AUTO_MAX_PASSES",
    "PROBES",
    "LowRankGradient",
    "RangeAccumulator",
    "SketchAccumulator",
    "SketchedGradient",
    "auto_sketch_size",
    "leading_ranks",
    "predicted_alignment",
    "reconstruct",
    "sketch_widths",
    "test_matrix",
]

_WIDE = (torch.float32, torch.float64)

# "auto": k = 2r + max(AUTO_MIN_OVERSAMPLE, ceil(AUTO_OVERSAMPLE_FRACTION · 2r)), chosen from the
# measurements of bench/sketch_accuracy.py (bench/NOTES.md, "Sketched LoRA-GA").
AUTO_OVERSAMPLE_FRACTION = 1.0
AUTO_MIN_OVERSAMPLE = 16
# Probes of the a-posteriori error estimate (Tropp et al. 2017 §6 use q = 10).
PROBES = 10
# passes="auto" goes on past the first pass when a layer's estimated ‖A − Â‖² / Σ_{i≤top} Ŝᵢ² exceeds this.
AUTO_ERROR_THRESHOLD = 0.2
# ... and then stops once the first-step alignment predicted from the top-2r energy
# (predicted_alignment) rose by at most this over the previous pass (bench/NOTES.md,
# "passes='auto'"), or at max_passes.
AUTO_ALIGNMENT_TOLERANCE = 0.01
AUTO_MAX_PASSES = 4


def auto_sketch_size(r: int) -> int:
    """The default range-sketch width ``k`` for LoRA rank ``r`` (LoRA-GA needs the top ``2r``).

    ``k = 2r + max(16, 2r)``, i.e. ``4r`` from r = 8 on; the co-range sketch is ``l = 2k + 1``.
    See bench/NOTES.md ("Sketched LoRA-GA") for the measurements behind it.
    """
    if r < 1:
        raise ValueError(f"fastlora: r must be >= 1, got {r}")
    return 2 * r + max(AUTO_MIN_OVERSAMPLE, math.ceil(AUTO_OVERSAMPLE_FRACTION * 2 * r))


def sketch_widths(sketch: int | str, targets: Mapping[str, nn.Module]) -> dict[str, int]:
    """``{name: k}`` for ``estimate_gradient(sketch=...)``: an int for every layer, or ``"auto"``
    (:func:`auto_sketch_size` of each LoRA layer's rank; refused for a plain layer, which has none)."""
    if sketch == "auto":
        ks = {}
        for name, module in targets.items():
            if not isinstance(module, LoraLinear):
                raise ValueError(
                    "fastlora: sketch='auto' sizes the sketch from each layer's LoRA rank; on an "
                    f"unpatched model ({name!r} is no LoraLinear) give an int (e.g. sketch=4*r)"
                )
            ks[name] = auto_sketch_size(module.r)
        return ks
    if isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1:
        raise ValueError(f"fastlora: sketch must be 'auto', a positive int or None; got {sketch!r}")
    return dict.fromkeys(targets, sketch)


def predicted_alignment(energy: float, total: float) -> float:
    """The first-step alignment of a LoRA-GA init predicted from the gradient energy it captures.

    With ``B`` and ``A`` from the top-2r singular vectors of ``G`` (any split of the 2r between
    them), one step changes the weight by ``d ∝ B·Bᵀ·G + G·Aᵀ·A``, and ``⟨d, G⟩ = ‖d‖² =
    Σ_{i≤2r} σᵢ²`` (the cross term vanishes), so ``cos(d, G) = sqrt(Σ_{i≤2r} σᵢ² / ‖G‖²_F)``; over
    layers of equal scale, ``sqrt(energy / total)`` with both summed over layers. ``energy`` from
    a projection pass is a lower bound of the exact one and rises with every pass; ``total`` is the
    probes' estimate of ``Σ ‖G‖²_F``, raised to the projection's whole energy where that is larger
    (10 probes are noisy where a few directions dominate). LoRA-GA's default stable scale weights
    layers by ``out^(1/2)``, so the measured alignment differs somewhat; the *rise* from pass to
    pass is what ``passes="auto"`` uses.
    """
    return math.sqrt(energy / total) if total > 0 else 0.0


def leading_ranks(targets: Mapping[str, nn.Module], ks: Mapping[str, int]) -> dict[str, int]:
    """How many leading triplets of each layer must be accurate: the ``2r`` LoRA-GA uses for a LoRA
    layer, half the sketch width for a plain one (the oversampling ``auto_sketch_size`` leaves)."""
    return {
        name: min(2 * m.r, ks[name]) if isinstance(m, LoraLinear) else max(1, ks[name] // 2)
        for name, m in targets.items()
    }


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
        passes: passes taken over the data: 1 (the single-pass reconstruction) or more (projection
            passes, one subspace iteration each).
        sizes: ``{name: (k, q)}``: the range-sketch width, and the co-range width (one pass) or
            the projection passes' basis width.
        errors: ``{name: ε}``, the first pass's a-posteriori estimate of ``‖G − Ĝ‖²_F / Σ Ŝᵢ²`` over
            the leading triplets that matter (see the module docstring); empty without probes.
        energies: the model-wide energy ``Σ_layers Σ_{i≤2r} Sᵢ²`` after each projection pass (the
            second on; empty for one pass).
        alignments: :func:`predicted_alignment` after each projection pass: what
            ``passes="auto"`` watches settle.
    """

    def __init__(
        self,
        factors: dict[str, LowRankGradient],
        num_batches: int,
        passes: int,
        sizes: dict[str, tuple[int, int]],
        errors: Mapping[str, float] | None = None,
        energies: Sequence[float] = (),
        alignments: Sequence[float] = (),
    ) -> None:
        self._factors = dict(factors)
        self.num_batches = int(num_batches)
        self.passes = passes
        self.sizes = dict(sizes)
        self.errors = dict(errors or {})
        self.energies = list(energies)
        self.alignments = list(alignments)

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
        factors = {k: v.to(device) for k, v in self._factors.items()}
        return SketchedGradient(
            factors, self.num_batches, self.passes, self.sizes, self.errors, self.energies, self.alignments
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
    """Range and co-range sketches ``Y = A·Ω``, ``W = Ψ·A`` of every layer's summed gradient, and
    ``probes`` rows ``Z = Φ·A`` for the a-posteriori error estimate (stacked under ``W``).

    Args:
        shapes: ``{name: (out, in)}``.
        k: range-sketch width, an int for every layer or ``{name: k}``; clamped to ``min(out, in)``
            (at that width the sketch is exact).
        l: co-range width (default ``2k + 1``, Tropp et al. 2017), clamped to ``max(out, in)``.
        seed: seed of the test matrices (must be the same on every rank).
        devices: where each layer's sketches live (default: the CPU; pass the layers' devices).
        dtype: accumulation dtype (fp32; fp64 for exactness tests).
        reconstruct: whether :meth:`result` runs the reconstruction (the first of several passes only
            needs the co-range bases, :meth:`corange_bases`).
        probes: rows of the error estimate (0: none).
        top: ``{name: t}`` (or one int), the leading triplets the error is measured against
            (default: all ``k``).

    Attributes:
        errors: filled by :meth:`result` when ``probes > 0``: ``{name: ε}``, the estimate of
            ``‖A − Â‖²_F / Σ_{i≤t} Ŝᵢ²`` (sums, so the number of batches cancels).
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
        probes: int = 0,
        top: int | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(shapes)
        if probes < 0:
            raise ValueError(f"fastlora: probes must be >= 0, got {probes}")
        self.seed = seed
        self.dtype = dtype
        self.do_reconstruct = reconstruct
        self.probes = probes
        self.top = dict(top) if isinstance(top, Mapping) else dict.fromkeys(self.shapes, top)
        self.errors: dict[str, float] = {}
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
                "W": torch.zeros(ll + probes, lay.N, dtype=dtype, device=dev),
            }
            self.layers[name] = lay
            self.sizes[name] = (kk, ll)

    def test_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(Ω [N, k], [Ψ; Φ] [l + probes, M], transposed)`` of layer ``name`` (fp32), ``A = Gᵀ`` if
        transposed; the first ``l`` rows of the second are Ψ, the rest the probes Φ."""
        lay, (k, k_co) = self.layers[name], self.sizes[name]
        omega = test_matrix(self.seed, "omega", lay.N, k)
        psi = test_matrix(self.seed, "psi", k_co + self.probes, lay.M)
        return omega, psi, lay.transposed

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        lay, (k, k_co) = self.layers[name], self.sizes[name]
        a, b = lay.operands(x, dy)  # A = aᵀ·b,  a [T, M], b [T, N]
        omega = self._tests.get("omega", lay.N, k, b.dtype if b.dtype not in _WIDE else self.dtype, b.device)
        rows = k_co + self.probes
        psi = self._tests.get("psi", rows, lay.M, a.dtype if a.dtype not in _WIDE else self.dtype, a.device)
        Y, W = lay.sums["Y"], lay.sums["W"]
        y = mm_wide(a.t(), mm_wide(b, omega))  # aᵀ·(b·Ω)   [M, k]
        w = mm_wide(mm_wide(psi, a.t()), b)  # ([Ψ; Φ]·aᵀ)·b   [l + probes, N]
        Y.add_(y.to(Y.device, Y.dtype))
        W.add_(w.to(W.device, W.dtype))
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}\0{part}": t for name, lay in self.layers.items() for part, t in lay.sums.items()}

    def result(self, num_batches: int) -> dict[str, LowRankGradient]:
        """Per layer the factors of the averaged gradient (``{}`` when ``reconstruct=False``); with
        probes, also :attr:`errors`."""
        if not self.do_reconstruct:
            return {}
        out = {}
        for name, lay in self.layers.items():
            _, test, _ = self.test_matrices(name)
            k_co = self.sizes[name][1]
            Y, W = lay.sums["Y"], lay.sums["W"]
            test = test.to(Y.device)
            U, S, Vh = reconstruct(Y, W[:k_co], test[:k_co])
            if self.probes:
                # ‖Z − Φ·Â‖² / q, with Φ·Â = (Φ·U)·diag(S)·Vh: an unbiased estimate of ‖A − Â‖²_F
                phi, Z = test[k_co:].double(), W[k_co:].double()
                err2 = float(((Z - ((phi @ U) * S) @ Vh) ** 2).sum()) / self.probes
                top = S[: self.top[name] or len(S)]
                self.errors[name] = err2 / max(float((top**2).sum()), torch.finfo(torch.float64).tiny)
            U, S, Vh = lay.to_g(U, S / num_batches, Vh)
            out[name] = LowRankGradient(*(t.to(self.dtype).contiguous() for t in (U, S, Vh)))
        return out

    def total_energy(self, num_batches: int) -> float:
        """The probes' unbiased estimate of ``Σ_layers ‖G‖²_F`` of the averaged gradients
        (``E‖Φ·A‖²_F = q·‖A‖²_F``); 0 without probes."""
        if not self.probes:
            return 0.0
        total = 0.0
        for name, lay in self.layers.items():
            Z = lay.sums["W"][self.sizes[name][1] :].double()
            total += float((Z**2).sum()) / self.probes / num_batches**2
        return total

    def corange_bases(self) -> dict[str, torch.Tensor]:
        """``P = orth(Wᵀ)`` per layer (``[N, min(l + probes, N)]``, fp32/fp64): the row-space basis of
        ``A`` found by the co-range sketch and the probes, the test matrix of the second pass."""
        out = {}
        for name, lay in self.layers.items():
            W = lay.sums["W"]
            out[name] = torch.linalg.qr(W.double().t()).Q.to(self.dtype)
        return out

    def nbytes(self) -> int:
        """Bytes of the sketches (the test matrices, shared between layers of equal size, not counted)."""
        return sum(t.numel() * t.element_size() for lay in self.layers.values() for t in lay.sums.values())


class RangeAccumulator(GradientAccumulator):
    """A projection pass (the second and later passes): per layer the exact product of the sketched
    matrix ``A`` with a given orthonormal basis -- ``Y = A·P`` (``side="right"``, ``P [N, q]``) or
    ``Z = Qᵀ·A`` (``side="left"``, ``Q [M, q]``). The bases are fp32 and multiply half-precision
    activations as a hi/lo pair (see :func:`mm_wide`).

    ``result`` is the SVD of the projection ``A·P·Pᵀ`` (or ``Q·Qᵀ·A``), see the module docstring;
    :meth:`next_bases` gives the next pass's bases (the other side: one subspace iteration per pass).

    Attributes:
        energies: filled by :meth:`result`: ``{name: Σ_{i≤t} Sᵢ²}`` of the averaged gradient's
            projection over the leading ``top`` triplets (all of them without ``top``), the energy
            LoRA-GA's directions capture; it rises toward the exact value from pass to pass.
        totals: filled by :meth:`result`: ``{name: Σ Sᵢ²}``, the projection's whole energy (a lower
            bound of ``‖G‖²_F``).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        bases: Mapping[str, torch.Tensor],
        *,
        side: str = "right",
        devices: Mapping[str, torch.device] | torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        top: int | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(shapes)
        if side not in ("right", "left"):
            raise ValueError(f"fastlora: side must be 'right' or 'left', got {side!r}")
        self.side = side
        self.dtype = dtype
        self.top = dict(top) if isinstance(top, Mapping) else dict.fromkeys(self.shapes, top)
        self.energies: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.layers: dict[str, _Layer] = {}
        self.bases: dict[str, torch.Tensor] = {}
        for name, (m, n) in self.shapes.items():
            lay = _Layer(m, n)
            P = bases[name]
            rows = lay.N if side == "right" else lay.M
            if P.shape[0] != rows:
                raise ValueError(f"fastlora: basis of {name!r} has {P.shape[0]} rows, expected {rows}")
            dev = devices.get(name) if isinstance(devices, Mapping) else devices
            shape = (lay.M, P.shape[1]) if side == "right" else (P.shape[1], lay.N)
            lay.sums = {"Y": torch.zeros(shape, dtype=dtype, device=dev)}
            self.layers[name] = lay
            self.bases[name] = P.to(device=dev, dtype=dtype)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        lay = self.layers[name]
        a, b = lay.operands(x, dy)  # A = aᵀ·b,  a [T, M], b [T, N]
        P = self.bases[name]
        if P.device != b.device:
            P = self.bases[name] = P.to(b.device)
        Y = lay.sums["Y"]
        # right: aᵀ·(b·P)  [M, q];  left: (a·Q)ᵀ·b = Qᵀ·aᵀ·b  [q, N]
        y = mm_wide(a.t(), mm_wide(b, P)) if self.side == "right" else mm_wide(mm_wide(a, P).t(), b)
        Y.add_(y.to(Y.device, Y.dtype))
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}\0Y": lay.sums["Y"] for name, lay in self.layers.items()}

    def result(self, num_batches: int) -> dict[str, LowRankGradient]:
        out = {}
        for name, lay in self.layers.items():
            Y = lay.sums["Y"].double()
            basis = self.bases[name].to(Y.device).double()
            if self.side == "right":  # A·P = Û·S·V̂ᵀ  ->  A·P·Pᵀ = Û·S·(P·V̂)ᵀ
                U, S, Vt = torch.linalg.svd(Y, full_matrices=False)
                Vh = (basis @ Vt.t()).t()
            else:  # Qᵀ·A = Ũ·S·Vh  ->  Q·Qᵀ·A = (Q·Ũ)·S·Vh
                Ut, S, Vh = torch.linalg.svd(Y, full_matrices=False)
                U = basis @ Ut
            S = S / num_batches
            self.energies[name] = float((S[: self.top[name] or len(S)] ** 2).sum())
            self.totals[name] = float((S**2).sum())
            U, S, Vh = lay.to_g(U, S, Vh)
            out[name] = LowRankGradient(*(t.to(self.dtype).contiguous() for t in (U, S, Vh)))
        return out

    def next_bases(self) -> dict[str, torch.Tensor]:
        """The bases of the next pass, on the other side: ``orth(A·P)`` (``[M, q]``) after a right
        pass, ``orth((Qᵀ·A)ᵀ)`` (``[N, q]``) after a left one -- one step of subspace iteration."""
        out = {}
        for name, lay in self.layers.items():
            Y = lay.sums["Y"].double()
            out[name] = torch.linalg.qr(Y if self.side == "right" else Y.t()).Q.to(self.dtype)
        return out
