"""fastlora.lora_ga.sketch: exact sketches, exact low-rank reconstruction, the a-posteriori error
estimate and passes="auto", accuracy on real gradients, distributed sums, and
patch(method="lora_ga", sketch=...) end to end.

All on the CPU with tiny models built from configs. The accuracy numbers on larger models and the
choice of the default width are in bench/sketch_accuracy.py and bench/NOTES.md.
"""

from __future__ import annotations

import copy
import textwrap
import warnings

import pytest
import torch
from helpers import logits, quantize_model_bnb, relerr, run_two_ranks, tiny_llama, token_batches

import fastlora
from fastlora.lora_ga import (
    LowRankGradient,
    SketchAccumulator,
    SketchedGradient,
    auto_sketch_size,
    first_step_alignment,
)
from fastlora.lora_ga import sketch as sketch_module
from fastlora.lora_ga.sketch import test_matrix as sketch_test_matrix
from fastlora.lora_ga.targets import default_targets


def _shapes(model) -> tuple[dict, dict]:
    targets = default_targets(model, "all-linear", None)
    return targets, {n: (m.out_features, m.in_features) for n, m in targets.items()}


def _min_cos(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """cos of the largest principal angle between the column spaces of U1 and U2."""
    return float(torch.linalg.svdvals(U1.double().t() @ U2.double()).min())


def _captured(G: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> float:
    """‖Uᵀ·G‖² + ‖G·V‖², the gradient energy a LoRA-GA init on (U, V) steps along."""
    G = G.double()
    return float((U.double().t() @ G).norm() ** 2 + (G @ Vh.double().t()).norm() ** 2)


# -- the sketch itself ----------------------------------------------------------------------------------------


def test_sketch_equals_explicit_products_fp64():
    """Y = A·Ω and W = Ψ·A of the summed gradient, with A = G or Gᵀ (the wider side gets the k side)."""
    model = tiny_llama().double()
    data = token_batches(3, seq=16)
    targets, shapes = _shapes(model)
    dense = fastlora.estimate_gradient(model, data, progress=False, targets=targets)
    acc = SketchAccumulator(shapes, 6, seed=3, dtype=torch.float64, reconstruct=False)
    fastlora.estimate_gradient(model, data, progress=False, targets=targets, accumulator=acc)
    assert acc.updates == dict.fromkeys(shapes, 3)
    state = acc.state()
    seen_transposed = set()
    for name in shapes:
        omega, psi, transposed = acc.test_matrices(name)
        seen_transposed.add(transposed)
        G_sum = dense[name] * dense.num_batches
        A = G_sum.t() if transposed else G_sum
        assert A.shape[0] >= A.shape[1]  # the co-range (wider) sketch is on the smaller side
        k, k_co = acc.sizes[name]
        assert (k, k_co) == (6, 13)  # l = 2k + 1
        assert relerr(state[f"{name}\0Y"], A @ omega.double()) < 1e-12, name
        assert relerr(state[f"{name}\0W"], psi.double() @ A) < 1e-12, name
    assert seen_transposed == {False, True}  # down_proj (in > out) is sketched as Gᵀ


def test_test_matrices_shared_deterministic_and_exact_in_half_precision():
    a = sketch_test_matrix(0, "omega", 40, 8)
    assert torch.equal(a, sketch_test_matrix(0, "omega", 40, 8))
    assert not torch.equal(a, sketch_test_matrix(1, "omega", 40, 8))
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(a.to(dt).float(), a)  # the very values the reconstruction uses
    assert 0.9 < float(a.std()) < 1.1


@pytest.mark.parametrize("transposed", [False, True])
def test_reconstruction_exact_for_low_rank_gradient(transposed):
    """An exactly rank-5 G (5 tokens) is recovered exactly by a width-8 single-pass sketch."""
    m, n = (40, 70) if transposed else (70, 40)
    torch.manual_seed(0)
    x, dy = torch.randn(5, n, dtype=torch.float64), torch.randn(5, m, dtype=torch.float64)
    acc = SketchAccumulator({"l": (m, n)}, 8, dtype=torch.float64)
    acc.add("l", x[:2], dy[:2])  # two batches: the sum is what is sketched
    acc.add("l", x[2:], dy[2:])
    assert acc.layers["l"].transposed == transposed
    f = acc.result(2)["l"]
    G = dy.t() @ x / 2
    assert f.shape == (m, n) and f.U.shape == (m, 8) and f.Vh.shape == (8, n)
    assert relerr(f.dense(), G) < 1e-10
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(f.S[:5], S[:5], rtol=1e-10, atol=1e-12)
    assert _min_cos(f.U[:, :5], U[:, :5]) > 1 - 1e-10 and _min_cos(f.Vh[:5].t(), Vh[:5].t()) > 1 - 1e-10
    torch.testing.assert_close(f.U.t() @ f.U, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)


def test_full_width_sketch_is_exact_and_so_are_later_passes():
    """k = min(out, in): the sketch spans everything, so every pass (a right projection on pass 2,
    a left one on pass 3) reproduces G exactly."""
    model = tiny_llama().double()
    data = token_batches(2, seq=16)
    dense = fastlora.estimate_gradient(model, data, progress=False)
    for passes in (1, 2, 3):
        est = fastlora.estimate_gradient(model, data, progress=False, sketch=128, passes=passes)
        assert isinstance(est, SketchedGradient) and est.passes == passes and est.num_batches == 2
        for name in dense:
            assert relerr(est[name].dense(), dense[name]) < 1e-9, (passes, name)


# -- accuracy on a real gradient ---------------------------------------------------------------------------------


def test_sketched_subspaces_and_alignment_on_real_gradient():
    """tests/helpers' tiny Llama at random init on random tokens: flat spectra (the top 2r = 8 hold
    only ~40-70% of the gradient's energy), the hardest case of bench/sketch_accuracy.py."""
    base = tiny_llama()
    data = token_batches(16, seq=16)
    r = 4
    model = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    dense = fastlora.estimate_gradient(model, data, progress=False)
    one = fastlora.estimate_gradient(model, data, progress=False, sketch="auto", passes=1)
    two = fastlora.estimate_gradient(model, data, progress=False, sketch="auto", passes=2)
    assert set(one) == set(dense) == set(two)
    assert one.sizes["model.layers.0.mlp.up_proj"] == (auto_sketch_size(r), 2 * 24 + 1) and auto_sketch_size(r) == 24
    for name, G in dense.items():
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        best = _captured(G, U[:, : 2 * r], Vh[: 2 * r])
        # the gradient energy LoRA-GA's directions step along, relative to the exact top-2r's
        assert _captured(G, one[name].U[:, : 2 * r], one[name].Vh[: 2 * r]) > 0.6 * best, name
        assert _captured(G, two[name].U[:, : 2 * r], two[name].Vh[: 2 * r]) > 0.97 * best, name
        # a power iteration aligns the subspaces: overlap ‖UₛᵀUₑ‖²/2r, and the top singular value
        assert float((two[name].U[:, : 2 * r].double().t() @ U[:, : 2 * r]).norm() ** 2 / (2 * r)) > 0.9, name
        torch.testing.assert_close(two[name].S[0].double(), S[0], rtol=0.05, atol=0)
    cos = {}
    for label, grads in (("exact", dense), ("one", one), ("two", two)):
        ga = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=grads, svd="exact")
        cos[label] = first_step_alignment(ga, dense)[0]
    assert cos["exact"] > 0.85, cos
    assert cos["one"] > cos["exact"] - 0.02, cos  # 16 batches: single pass is close here
    assert cos["two"] > cos["exact"] - 0.005, cos


# -- the a-posteriori error estimate and passes="auto" --------------------------------------------------------


def test_error_estimate_is_unbiased():
    """‖Z − Φ·Â‖²/q estimates ‖A − Â‖²_F: many probes on a flat random gradient, against the truth."""
    torch.manual_seed(0)
    m, n, k = 90, 60, 12
    x, dy = torch.randn(200, n, dtype=torch.float64), torch.randn(200, m, dtype=torch.float64)
    acc = SketchAccumulator({"l": (m, n)}, k, dtype=torch.float64, probes=400, top=4)
    acc.add("l", x, dy)
    f = acc.result(1)["l"]
    G = dy.t() @ x
    true = float((G - f.dense()).norm() ** 2 / (f.S[:4] ** 2).sum())
    assert true > 1.0  # a flat spectrum: the rank-12 reconstruction misses most of it
    assert abs(acc.errors["l"] / true - 1) < 0.15, (acc.errors["l"], true)
    exact = SketchAccumulator({"l": (m, n)}, k, dtype=torch.float64, probes=10, top=4)
    exact.add("l", x[:5], dy[:5])  # rank 5 < k: reconstructed exactly, estimated error ~0
    exact.result(1)
    assert exact.errors["l"] < 1e-12


def test_auto_passes_take_more_passes_only_when_needed():
    base = tiny_llama()
    r = 4
    model = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    # random tokens on a random model: flat spectra, the single pass is unreliable -> projection
    # passes until the predicted alignment settles (here at once: pass 3 adds < 1e-3)
    flat = token_batches(6, seq=16)
    auto = fastlora.estimate_gradient(model, flat, sketch="auto", progress=False)
    three = fastlora.estimate_gradient(model, flat, sketch="auto", passes=3, progress=False)
    assert max(auto.errors.values()) > sketch_module.AUTO_ERROR_THRESHOLD
    assert auto.passes == 3 and len(auto.energies) == len(auto.alignments) == 2 and set(auto.errors) == set(auto)
    assert auto.energies[1] - auto.energies[0] >= 0 and 0 <= auto.alignments[1] - auto.alignments[0] < 1e-3
    assert 0.8 < auto.alignments[1] < 1  # the exact init's measured alignment here is ~0.9
    assert three.energies == auto.energies
    for name in three:
        torch.testing.assert_close(auto[name].S, three[name].S)
    # four tokens: every gradient has rank <= 4 < k, the sketch is exact and one pass suffices
    tiny = token_batches(1, batch=1, seq=4)
    one = fastlora.estimate_gradient(model, tiny, sketch="auto", progress=False)
    assert one.passes == 1 and max(one.errors.values()) < 1e-6 and one.energies == []
    # a one-shot iterator cannot be read twice: the single pass is kept, with a warning naming the layer
    with pytest.warns(UserWarning, match=r"estimated relative error of .* more passes would fix it"):
        it = fastlora.estimate_gradient(model, iter(flat), sketch="auto", progress=False)
    assert it.passes == 1


class _TwoLinear(torch.nn.Module):
    """Two bias-free linear layers; with a loss ``-Σ y·t`` the last one's gradient is ``tᵀ·h`` (and the
    first one's ``(t·W₂)ᵀ·x``): pure noise targets give Gaussian gradients, the flattest spectrum there is."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(n, m, bias=False)
        self.b = torch.nn.Linear(m, m, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _linear_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, t = batch
    return -(model(x) * t).sum() / x.shape[0]


def _target_batches(n: int, m: int, signal: torch.Tensor | None, noise: float, count: int = 4, tokens: int = 512):
    """``(x, t)`` batches with ``t = x·signalᵀ + noise·ε``: the gradient is the signal plus a
    Gaussian matrix of relative size ~ noise / sqrt(tokens)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(tokens, n, generator=gen)
        t = noise * torch.randn(tokens, m, generator=gen)
        out.append((x, t if signal is None else t + x @ signal.t()))
    return out


def _alignment_delta(base: torch.nn.Module, data: list, r: int, **sketch_kw) -> tuple[float, SketchedGradient]:
    """(the sketched init's first-step alignment minus the exact init's, the sketched estimate)."""
    model = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    dense = fastlora.estimate_gradient(model, data, loss_fn=_linear_loss, progress=False)
    est = fastlora.estimate_gradient(model, data, loss_fn=_linear_loss, progress=False, sketch="auto", **sketch_kw)
    exact = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=dense, svd="exact")
    sketched = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=est)
    return first_step_alignment(sketched, dense)[0] - first_step_alignment(exact, dense)[0], est


def test_auto_passes_keep_the_promise_on_a_flat_spectrum_at_width():
    """Gaussian gradients of 384/512-wide layers with 2048 tokens: the regime of the random-init
    8B shape on random tokens (bench/NOTES.md: exact alignment ~0.3, two passes lose ~0.04). The
    rule before issue 15's fix stopped at two passes; passes="auto" must go on until it is within 0.02."""
    base, r = _TwoLinear(384, 512), 4
    data = _target_batches(384, 512, None, noise=1.0)
    two, _ = _alignment_delta(base, data, r, passes=2)
    assert two < -0.02, two  # the case more passes are for
    with warnings.catch_warnings():
        # at max_passes the predicted rise is right at the tolerance here: whether it warns is not the point
        warnings.simplefilter("ignore")
        auto, est = _alignment_delta(base, data, r)
    assert est.passes >= 3 and auto > -0.02, (auto, est.passes, est.alignments)


def test_auto_passes_stop_early_on_a_concentrated_spectrum():
    """A strong rank-8 signal (r = 4: the top 2r) under noise that makes the single pass's error
    estimate exceed the threshold: the projection passes converge at once, so "auto" stops at pass 3
    without a warning; with max_passes=2 it stops at 2 (no change to judge, no warning)."""
    n, m, r = 96, 128, 4
    gen = torch.Generator().manual_seed(2)
    signal = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) / 2
    base, data = _TwoLinear(n, m), _target_batches(n, m, signal, noise=20.0, count=2, tokens=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delta, est = _alignment_delta(base, data, r)
        assert max(est.errors.values()) > sketch_module.AUTO_ERROR_THRESHOLD
        assert est.passes == 3 and est.alignments[1] - est.alignments[0] < sketch_module.AUTO_ALIGNMENT_TOLERANCE
        assert delta > -1e-3, delta
        capped = _alignment_delta(base, data, r, max_passes=2)[1]
    assert capped.passes == 2


def test_auto_passes_warn_when_they_do_not_settle_by_max_passes():
    base, r = _TwoLinear(384, 512), 4
    data = _target_batches(384, 512, None, noise=1.0)
    model = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    with pytest.warns(
        UserWarning,
        match=r"max_passes=3 before the sketch converged.*rose by .*alignment .* higher.*passes=5.*sketch=None",
    ):
        est = fastlora.estimate_gradient(model, data, loss_fn=_linear_loss, sketch="auto", max_passes=3, progress=False)
    assert est.passes == 3
    # explicit passes never warn and never stop early
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = fastlora.estimate_gradient(model, data, loss_fn=_linear_loss, sketch="auto", passes=3, progress=False)
    assert est.passes == 3 and len(est.energies) == 2


def test_auto_sketch_keeps_its_promise_on_flat_spectra():
    """patch(method="lora_ga", sketch="auto") within 0.02 of the exact init's first-step alignment on a
    flat-spectrum gradient where a single pass loses more (bench/sketch_accuracy.py --auto: 5 families)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=96, intermediate_size=240, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = Qwen2ForCausalLM(cfg).eval()
    data = token_batches(4, seq=32, vocab=256, seed=3)
    r = 4
    dense = fastlora.estimate_gradient(fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r), data, progress=False)
    cos = {}
    for label, kw in (("exact", dict(grads=dense, svd="exact")), ("one", dict(data=data, sketch="auto", passes=1))):
        cos[label] = first_step_alignment(
            fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, progress=False, **kw), dense
        )[0]
    cos["auto"] = first_step_alignment(
        fastlora.patch(
            copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, data=data, sketch="auto", progress=False
        ),
        dense,
    )[0]
    assert cos["one"] < cos["exact"] - 0.02, cos  # the case the second pass is for
    assert cos["auto"] > cos["exact"] - 0.02, cos


# -- distributed ---------------------------------------------------------------------------------------------------

_DIST_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import fastlora
    from helpers import tiny_llama
    rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(5):
        ids = torch.randint(0, 96, (2, 16), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    model = tiny_llama()
    mine = data[rank::world]  # uneven on purpose: 3 batches and 2
    res = {}
    for passes in (1, 2, "auto"):
        est = fastlora.estimate_gradient(model, mine, sketch=12, passes=passes, progress=False)
        res[passes] = {"n": est.num_batches, "passes": est.passes, "f": {k: tuple(v) for k, v in est.items()}}
    if rank == 0:
        torch.save({"res": res, "data": data}, out)
    dist.destroy_process_group()
    """
)


def test_distributed_two_gloo_ranks_equal_one_process_on_union(tmp_path):
    out = tmp_path / "out.pt"
    run_two_ranks(_DIST_WORKER, [str(out), str(tmp_path / "rendezvous")], tmp_path, timeout=150)
    saved = torch.load(out, weights_only=False)
    model = tiny_llama()
    for passes in (1, 2, "auto"):
        single = fastlora.estimate_gradient(model, saved["data"], sketch=12, passes=passes, progress=False)
        dist_res = saved["res"][passes]
        assert dist_res["n"] == 5 and dist_res["passes"] == single.passes
        for name, f in single.items():
            got = LowRankGradient(*dist_res["f"][name])
            # the same sketch of the same sum (up to summation order): the same factors
            assert relerr(got.dense(), f.dense()) < 1e-4, (passes, name)
            torch.testing.assert_close(got.S, f.S, rtol=1e-4, atol=1e-9)


# -- patch(method="lora_ga", sketch=...) -------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("passes", [1, 2])
def test_patch_lora_ga_sketched_end_to_end(quantized, passes):
    base = tiny_llama()  # in_features 64 / 128: multiples of bnb's CPU dequant block
    if quantized:
        base = quantize_model_bnb(base)
    data = token_batches(4, seq=16)
    ids = torch.randint(0, 96, (2, 12))
    r = 4
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, data=data, sketch="auto", passes=passes,
        progress=False,
    )  # fmt: skip
    layers = fastlora.lora_layers(model)
    assert len(layers) == 14
    c = None
    for layer in layers.values():
        assert layer.lora_A0 is not None and layer.offset_in_base != quantized
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        c = layer.out_features**0.25 / 4.0  # stable scale, gamma 16
        torch.testing.assert_close(A @ A.t(), c**2 * torch.eye(r), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(B.t() @ B, c**2 * torch.eye(r), rtol=1e-4, atol=1e-4)
    # the patched model starts equal to its base
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)
    # and its first step is (nearly) as aligned with full fine-tuning as the exact init's
    dense = fastlora.estimate_gradient(fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r), data, progress=False)
    exact = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=dense, svd="exact")
    assert first_step_alignment(model, dense)[0] > first_step_alignment(exact, dense)[0] - 0.02


def test_sketched_init_matches_exact_when_sketch_is_full_width():
    base = tiny_llama()
    data = token_batches(2, seq=16)
    r = 4
    dense = fastlora.estimate_gradient(base, data, progress=False)
    full = fastlora.estimate_gradient(base, data, progress=False, sketch=128)
    a = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=dense, svd="exact")
    b = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=full)
    for (na, la), (nb, lb) in zip(fastlora.lora_layers(a).items(), fastlora.lora_layers(b).items()):
        assert na == nb
        # the same subspaces (singular vectors' signs may differ): equal projectors B·Bᵀ, Aᵀ·A
        torch.testing.assert_close(lb.lora_B @ lb.lora_B.t(), la.lora_B @ la.lora_B.t(), rtol=0, atol=1e-4)
        torch.testing.assert_close(lb.lora_A.t() @ lb.lora_A, la.lora_A.t() @ la.lora_A, rtol=0, atol=1e-4)


def test_sketch_errors():
    base = tiny_llama()
    data = token_batches(1, seq=16)
    with pytest.raises(ValueError, match="sketch='auto'"):
        fastlora.estimate_gradient(base, data, sketch="auto", progress=False)  # unpatched: no rank to size from
    with pytest.raises(ValueError, match="sketch must be"):
        fastlora.estimate_gradient(base, data, sketch=0, progress=False)
    for bad in (0, 1.5, True, "two"):
        with pytest.raises(ValueError, match="passes must be"):
            fastlora.estimate_gradient(base, data, sketch=8, passes=bad, progress=False)
    with pytest.raises(ValueError, match="max_passes must be"):
        fastlora.estimate_gradient(base, data, sketch=8, max_passes=0, progress=False)
    with pytest.raises(ValueError, match="passes=2 is for sketch"):
        fastlora.estimate_gradient(base, data, passes=2, progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        fastlora.estimate_gradient(base, iter(data), sketch=8, passes=2, progress=False)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="top 2r"):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8, data=data, sketch=6, progress=False)
    assert not fastlora.lora_layers(model)  # the failed patch left the model as it was
