"""fastlora.lora_ga.init: the init formulas against a transcription of the reference, the SVDs,
the first-step alignment metric, and the offsets.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_llama, token_batches

import fastlora
from fastlora.lora_ga import first_step_alignment, lora_ga_factors, randomized_svd, top_singular


def _reference_init(G, r, direction, scale, s, gamma=16.0, W=None, perm=None):
    """A direct transcription of the reference's lora_ga_init (Outsider565/LoRA-GA, layer.py)."""
    U, _S, V = torch.linalg.svd(G, full_matrices=False)  # V here is already Vᵀ (rows)
    if direction == "ArBr":
        B = U[:, 0 : 2 * r : 2]
        A = V[1 : 2 * r : 2, :]
    elif direction == "A2rBr":
        B = U[:, :r]
        A = V[r : 2 * r, :]
    elif direction == "ArB2r":
        B = U[:, r : 2 * r]
        A = V[:r, :]
    elif direction == "random":
        indexes_A, indexes_B = perm[:r], perm[r:]
        B = U[:, indexes_B]
        A = V[indexes_A, :]
    if scale == "gd":
        A = A / s
        B = B / s
    elif scale == "unit":
        pass
    elif scale == "stable":
        m, _n = G.shape
        B = B * m**0.25 / gamma**0.5
        A = A * m**0.25 / gamma**0.5
    elif scale == "weightS":
        _, SW, _ = torch.linalg.svd(W, full_matrices=False)
        SW = SW / s
        avg_s = torch.sqrt(SW[:r]).mean()
        B = B * avg_s
        A = A * avg_s
    return A, B


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "weightS"])
def test_factors_match_reference_transcription(direction, scale):
    torch.manual_seed(0)
    m, n, r, s = 24, 40, 3, 2.5
    G = torch.randn(m, n, dtype=torch.float64)
    W = torch.randn(m, n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    A, B = lora_ga_factors(
        G, r, scaling=s, direction=direction, scale=scale, stable_gamma=9.0, svd="exact", weight=W, generator=gen
    )
    perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(7)) if direction == "random" else None
    A_ref, B_ref = _reference_init(G, r, direction, scale, s, gamma=9.0, W=W, perm=perm)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B, B_ref, rtol=1e-10, atol=1e-12)
    if direction == "random":  # A and B take disjoint halves of the top 2r
        assert sorted(perm.tolist()) == list(range(2 * r))


def test_stable_scale_formula_and_init_invariants():
    torch.manual_seed(0)
    m, n, r, gamma = 48, 32, 4, 16.0
    G = torch.randn(m, n)
    A, B = lora_ga_factors(G, r, scaling=2.0, svd="exact", stable_gamma=gamma)  # ArB2r, stable
    c = m**0.25 / math.sqrt(gamma)
    eye = torch.eye(r)
    torch.testing.assert_close(A @ A.t(), c**2 * eye, rtol=1e-5, atol=1e-5)  # orthonormal rows up to c
    torch.testing.assert_close(B.t() @ B, c**2 * eye, rtol=1e-5, atol=1e-5)  # orthonormal columns up to c
    U, _S, Vh = torch.linalg.svd(G, full_matrices=False)
    # the chosen singular subspaces: A spans the top-r right vectors, B the next r left vectors
    PA = Vh[:r].t() @ Vh[:r]
    PB = U[:, r : 2 * r] @ U[:, r : 2 * r].t()
    torch.testing.assert_close(A @ PA, A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(PB @ B, B, rtol=1e-4, atol=1e-5)


def _principal_cos(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the column spaces of U1 and U2."""
    return float(torch.linalg.svdvals(U1.t() @ U2).min())


def test_randomized_svd_subspaces_match_exact_on_real_gradients():
    base = tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    est = fastlora.estimate_gradient(base, token_batches(2, seq=16), progress=False)
    r = 8
    for name, G in est.items():
        Ue, Se, Vhe = top_singular(G, 2 * r, method="exact")
        gen = torch.Generator().manual_seed(0)
        Ur, Sr, Vhr = top_singular(G, 2 * r, method="randomized", q=4 * r, niter=4, generator=gen)
        assert _principal_cos(Ue, Ur) > 0.999, name
        assert _principal_cos(Vhe.t(), Vhr.t()) > 0.999, name
        torch.testing.assert_close(Sr, Se, rtol=1e-3, atol=1e-6)
    # and on a synthetic spectrum with a gap, against torch.svd_lowrank's own algorithm
    torch.manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(300, 300))
    Q2, _ = torch.linalg.qr(torch.randn(200, 200))
    S = torch.cat([torch.linspace(10, 5, 16), torch.rand(184) * 0.5])
    G = Q1[:, :200] @ torch.diag(S) @ Q2.t()
    U, _, Vh = randomized_svd(G, 32, 4, torch.Generator().manual_seed(1))
    assert _principal_cos(U[:, :16], Q1[:, :16]) > 0.9999
    assert _principal_cos(Vh[:16].t(), Q2[:, :16]) > 0.9999


def test_first_step_alignment_with_full_fine_tuning():
    """After GA init one SGD step moves the effective weight along the full-FT step (cos > 0.9)."""
    base = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    data = token_batches(2, seq=16)
    est = fastlora.estimate_gradient(base, data, progress=False)
    r = 8

    def first_step_cosine(model):
        layers = fastlora.lora_layers(model)
        before = {n: layer.delta_weight().clone() for n, layer in layers.items()}
        loss = sum(model(**b).loss for b in data) / len(data)  # full FT's step on the same data is -lr·G
        loss.backward()
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_A -= 1e-4 * layer.lora_A.grad
                layer.lora_B -= 1e-4 * layer.lora_B.grad
        d_eff = torch.cat([(layers[n].delta_weight() - before[n]).flatten() for n in layers])
        full = torch.cat([-est[n].flatten() for n in layers])
        return float(torch.nn.functional.cosine_similarity(d_eff.detach(), full, dim=0))

    ga = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=est, svd="exact")
    torch.manual_seed(1)
    std = fastlora.patch(copy.deepcopy(base), method="lora", r=r, alpha=2 * r)
    closed_ga, closed_std = first_step_alignment(ga, est)[0], first_step_alignment(std, est)[0]
    cos_ga, cos_std = first_step_cosine(ga), first_step_cosine(std)
    assert cos_ga > 0.9, cos_ga
    # the closed form (fastlora.lora_ga.first_step_alignment) agrees with the real SGD step
    assert abs(closed_ga - cos_ga) < 1e-3 and abs(closed_std - cos_std) < 1e-3, (closed_ga, cos_ga, closed_std, cos_std)
    # standard LoRA's step is G projected on a random r-dim subspace: cos ~ sqrt(r / d_in) (0.18 here)
    assert cos_std < 0.3, cos_std
