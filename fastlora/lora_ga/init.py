"""LoRA-GA initialisation from an estimated gradient: SVD, directions, scales, offsets.

LoRA-GA (Wang, Yu, Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000) initialises each adapter from the SVD of the layer's averaged full-weight gradient
``G = U·S·Vᵀ`` so that the first LoRA step moves the effective weight along the best rank-2r
approximation of G -- the full fine-tuning step -- instead of along a random direction.

The formulas below follow the paper's own code (repository Outsider565/LoRA-GA, file
``peft/src/peft/tuners/lora/layer.py``, method ``LoraLayer.lora_ga_init``), which is what its
published results used; the paper's printed stable-scale formula differs by a typo its author
acknowledged. With ``V = Vᵀ`` rows (right singular vectors) and ``s`` the LoRA scaling:

* directions (which singular vectors go to A and B; singular values are discarded):
    - ``ArB2r`` (default): ``B = U[:, r:2r]``, ``A = Vᵀ[:r, :]``
    - ``A2rBr``:           ``B = U[:, :r]``,   ``A = Vᵀ[r:2r, :]``
    - ``ArBr``:            ``B = U[:, 0:2r:2]``, ``A = Vᵀ[1:2r:2, :]``
    - ``random``:          a random permutation of ``range(2r)``: first r indices for A, the rest for B
* scales (one scalar applied to both A and B):
    - ``stable`` (default): ``× d_out^(1/4) / sqrt(gamma)`` with ``d_out = G.shape[0]``
    - ``gd``:              ``/ s``
    - ``unit``:            ``× 1`` (A and B orthonormal)
    - ``weightS``:         ``× mean(sqrt(S_W[:r] / s))``, ``S_W`` the singular values of ``W0``
* offset: ``W_init = W0 − s·B·A`` in fp32, so that the patched model starts equal to the base model.

fastlora differs from the reference in how, not what: the gradient comes from a streaming
accumulator (:mod:`fastlora.lora_ga.estimate`) rather than ``.grad`` of every weight, and where
subtracting the offset from ``W0`` would round it (a 4-bit or a bf16/fp16 ``W0``) the offset is kept
exactly as a frozen term inside :class:`~fastlora.LoraLinear`, which then computes
``W0 + s·(B·A − B0·A0)`` (:func:`apply_offset`, :func:`offset_in_base`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..layer import LoraLinear, is_conv1d
from ..patching import lora_layers

__all__ = [
    "DIRECTIONS",
    "OFFSETS",
    "SCALES",
    "SVD_METHODS",
    "apply_offset",
    "factors_from_singular",
    "first_step_alignment",
    "lora_ga_factors",
    "offset_in_base",
    "randomized_svd",
    "scale_factor",
    "select_directions",
    "top_singular",
]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")
SVD_METHODS = ("auto", "exact", "randomized")
OFFSETS = ("auto", "base", "frozen")


def randomized_svd(
    G: torch.Tensor, q: int, niter: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``q`` randomized SVD ``G ≈ U·diag(S)·Vh`` (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1).

    Randomized subspace iteration with re-orthonormalisation after every product, the algorithm
    of ``torch.svd_lowrank`` (which the reference calls with ``q = 4r``, ``niter = 4``); written out
    here so that the sketch takes an explicit generator -- every rank then gets the same factors.

    Returns:
        ``U [m, q]``, ``S [q]`` (descending), ``Vh [q, n]``.
    """
    m, n = G.shape
    q = min(q, m, n)
    omega = torch.randn(n, q, device=G.device, dtype=G.dtype, generator=generator)
    Q = torch.linalg.qr(G @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(G.t() @ Q).Q
        Q = torch.linalg.qr(G @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.t() @ G, full_matrices=False)
    return Q @ Ub, S, Vh


def top_singular(
    G: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    q: int | None = None,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``G`` (fp32): ``U [m, k]``, ``S [k]``, ``Vh [k, n]``.

    Args:
        G: the matrix (computed in fp32, or fp64 if given fp64).
        k: how many triplets.
        method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (:func:`randomized_svd` with
            ``q`` columns, default ``2k`` as the reference's ``4r`` for ``k = 2r``), or ``"auto"``:
            randomized when ``q`` is below ``min(G.shape)``, else exact.
        q, niter: the randomized sketch's width and power iterations.
        generator: RNG of the randomized sketch.
    """
    if G.dtype not in (torch.float32, torch.float64):
        G = G.float()
    q = min(q if q is not None else 2 * k, *G.shape)
    if method == "auto":
        method = "randomized" if q < min(G.shape) else "exact"
    if method == "exact":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    elif method == "randomized":
        U, S, Vh = randomized_svd(G, q, niter, generator)
    else:
        raise ValueError(f"fastlora: svd must be one of {SVD_METHODS}, got {method!r}")
    return U[:, :k], S[:k], Vh[:k]


def select_directions(
    U: torch.Tensor, Vh: torch.Tensor, r: int, direction: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, n], B [m, r])`` picked from the top-2r singular vectors (see the module docstring)."""
    if direction == "ArB2r":
        return Vh[:r], U[:, r : 2 * r]
    if direction == "A2rBr":
        return Vh[r : 2 * r], U[:, :r]
    if direction == "ArBr":
        return Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]
    if direction == "random":
        perm = torch.randperm(2 * r, generator=generator, device="cpu" if generator is None else generator.device)
        perm = perm.to(U.device)
        return Vh[perm[:r]], U[:, perm[r:]]
    raise ValueError(f"fastlora: direction must be one of {DIRECTIONS}, got {direction!r}")


def scale_factor(
    scale: str,
    *,
    d_out: int,
    scaling: float,
    stable_gamma: float = 16,
    weight_singular_values: torch.Tensor | None = None,
    r: int | None = None,
) -> float:
    """The scalar multiplying both A and B (see the module docstring for each formula)."""
    if scale == "stable":
        # Reference: B = B·m^0.25/gamma^0.5, A likewise, m = out features ("the scale of output is
        # only related to the feature_out").
        return d_out**0.25 / math.sqrt(stable_gamma)
    if scale == "gd":
        return 1.0 / scaling
    if scale == "unit":
        return 1.0
    if scale == "weightS":
        if weight_singular_values is None or r is None:
            raise ValueError("fastlora: scale='weightS' needs the base weight's singular values")
        return float(torch.sqrt(weight_singular_values[:r].double() / scaling).mean())
    raise ValueError(f"fastlora: scale must be one of {SCALES}, got {scale!r}")


def lora_ga_factors(
    G: torch.Tensor,
    r: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    svd: str = "auto",
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``(A [r, in], B [out, r])`` for one layer's averaged gradient ``G [out, in]`` (fp32).

    Args:
        G: the averaged gradient.
        r: the LoRA rank (``2r <= min(G.shape)``).
        scaling: the layer's LoRA scaling s (``alpha/r`` or ``alpha/sqrt(r)``).
        direction, scale, stable_gamma: see the module docstring.
        svd: ``"auto"``, ``"exact"`` or ``"randomized"`` (q = 4r, 4 power iterations, as the reference).
        weight: the dense base weight ``W0 [out, in]`` (only for ``scale="weightS"``).
        generator: RNG for the randomized SVD and the ``random`` direction.
    """
    m, n = G.shape
    if 2 * r > min(m, n):
        raise ValueError(f"fastlora: LoRA-GA needs 2r <= min(out, in); r={r} does not fit a {m}x{n} layer")
    U, _, Vh = top_singular(G, 2 * r, method=svd, q=4 * r, niter=4, generator=generator)
    return factors_from_singular(
        U, Vh, r, scaling=scaling, direction=direction, scale=scale, stable_gamma=stable_gamma, svd=svd,
        weight=weight, generator=generator,
    )  # fmt: skip


def factors_from_singular(
    U: torch.Tensor,
    Vh: torch.Tensor,
    r: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    svd: str = "auto",
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lora_ga_factors` from precomputed top-2r singular vectors ``U [out, ≥2r]``, ``Vh [≥2r, in]``
    (e.g. a sketched estimate's, :mod:`fastlora.lora_ga.sketch`); ``svd`` is then only the weightS SVD's method."""
    m = U.shape[0]
    if U.shape[1] < 2 * r or Vh.shape[0] < 2 * r:
        raise ValueError(f"fastlora: LoRA-GA needs the top 2r = {2 * r} singular vectors, got {U.shape[1]}")
    A, B = select_directions(U, Vh, r, direction, generator)
    s_w = None
    if scale == "weightS":
        if weight is None:
            raise ValueError("fastlora: scale='weightS' needs the base weight")
        _, s_w, _ = top_singular(weight.to(U.dtype), r, method=svd, q=4 * r, niter=4, generator=generator)
    c = scale_factor(scale, d_out=m, scaling=scaling, stable_gamma=stable_gamma, weight_singular_values=s_w, r=r)
    return (A * c).contiguous(), (B * c).contiguous()


# -- offsets and the first step ---------------------------------------------------------------------------


def offset_in_base(layer: LoraLinear, offset: str) -> bool:
    """Whether ``offset`` (``"auto"``, ``"base"`` or ``"frozen"``) subtracts ``s·B0·A0`` from the
    layer's base weight in place, or keeps it as a frozen term.

    ``"auto"`` subtracts in place only from an fp32/fp64 weight, where the rounding is ~1e-7
    relative. A bf16/fp16 weight would be rounded (bf16: ~4e-3 relative per entry; measured on a
    tiny Llama: init logits off by ~1e-2, and ``unpatch`` restoring W0 only to ~5e-4, see
    bench/lora_ga_offset.py), and a 4-bit one re-quantised, so those keep the exact frozen term.
    """
    if offset == "base":
        return True
    if offset == "frozen" or layer.is_quantized:
        return False
    return layer.base_layer.weight.dtype in (torch.float32, torch.float64)


@torch.no_grad()
def apply_offset(layer: LoraLinear, A: torch.Tensor, B: torch.Tensor, in_base: bool) -> None:
    """Set A, B and make the layer start equal to its base: ``W0 − s·B·A`` in place, or a frozen term."""
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    layer.set_frozen_offset(A.clone(), B.clone())
    if in_base:
        w = layer.base_layer.weight
        target = w.t() if is_conv1d(layer.base_layer) else w
        f32 = torch.float32
        offset = (B.to(target.device, f32) @ A.to(target.device, f32)) * layer.scaling
        target.copy_((target.to(f32) - offset).to(target.dtype))
    layer.offset_in_base = in_base


@torch.no_grad()
def first_step_alignment(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """How closely the first SGD step of freshly initialised LoRA layers follows full fine-tuning.

    At the init the effective weight is W0, so the gradient there is ``G = grads[name]`` and SGD's
    LoRA gradients are ``dA = s·Bᵀ·G`` and ``dB = s·G·Aᵀ``: one step of size lr changes the effective
    weight by ``−lr·s²·(B·Bᵀ·G + G·Aᵀ·A) + O(lr²)``, where full fine-tuning's step is ``−lr·G``.

    Returns:
        The cosine between the two steps over all LoRA layers concatenated (LoRA-GA: close to 1;
        standard LoRA with B = 0: about sqrt(r / in_features)), and the cosine per layer.
    """
    steps, fulls, per_layer = [], [], {}
    for name, layer in lora_layers(model).items():
        G = grads[name].double()
        A, B = layer.lora_A.double(), layer.lora_B.double()
        d = B @ (B.t() @ G) + (G @ A.t()) @ A
        steps.append(d.flatten())
        fulls.append(G.flatten())
        per_layer[name] = float(torch.nn.functional.cosine_similarity(d.flatten(), G.flatten(), dim=0))
    cos = torch.nn.functional.cosine_similarity(torch.cat(steps), torch.cat(fulls), dim=0)
    return float(cos), per_layer
