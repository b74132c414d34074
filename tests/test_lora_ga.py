"""LoRA-GA: streaming gradient estimation (plain, NF4, offloaded, distributed) and the init.

Everything runs on the CPU on tiny models built from configs; references are autograd gradients
(float64 where the check is exact) and direct transcriptions of the LoRA-GA reference formulas.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap

import pytest
import torch
from helpers import quantize_model_bnb, relerr, run_two_ranks, tiny_gpt2, tiny_llama, token_batches

import fastlora
from fastlora.estimate import DenseAccumulator, HostAccumulator, outer_fp32
from fastlora.lora_ga import first_step_alignment, lora_ga_factors, randomized_svd, top_singular
from fastlora.offload import BlockOffloader, find_blocks
from fastlora.quant import dequantize, from_bnb


def _autograd_grads(model: torch.nn.Module, names: list[str], data: list[dict]) -> dict[str, torch.Tensor]:
    """The reference way: .grad of every target weight, summed over batches, averaged."""
    model = copy.deepcopy(model)
    weights = {}
    for n in names:
        module = model.get_submodule(n)
        w = module.weight
        w.requires_grad_(True)
        weights[n] = (w, type(module).__name__ == "Conv1D")
    for batch in data:
        model(**batch).loss.backward()
    return {n: (w.grad.t() if conv else w.grad) / len(data) for n, (w, conv) in weights.items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- estimation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_estimate_equals_autograd_fp64(builder, patched):
    base = builder().double()
    data = token_batches(3)
    model = fastlora.patch(copy.deepcopy(base), r=2, alpha=4) if patched else copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    est = fastlora.estimate_gradient(model, data, progress=False)
    assert isinstance(est, fastlora.GradientEstimate) and est.num_batches == 3
    ref = _autograd_grads(base, list(est), data)
    assert set(est) == set(ref) and len(est) > 0
    for n in est:
        assert est[n].dtype == torch.float64  # an fp64 model is accumulated in fp64
        assert est[n].shape == ref[n].shape
        assert relerr(est[n], ref[n]) < 1e-12, n
    # nothing of the model changed: flags restored, no .grad anywhere
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_estimate_fp32_and_iters_limit():
    base = tiny_llama()
    data = token_batches(5)
    est = fastlora.estimate_gradient(base, data, iters=2, progress=False)
    ref = _autograd_grads(base, list(est), data[:2])
    assert est.num_batches == 2
    for n in est:
        assert est[n].dtype == torch.float32
        assert relerr(est[n], ref[n]) < 1e-5, n


def test_estimate_nf4_equals_gradient_at_dequantized_weights():
    base = tiny_llama()
    q = quantize_model_bnb(base)
    data = token_batches(2)
    # the float model holding exactly the dequantised weights
    deq = copy.deepcopy(base)
    for name, module in q.named_modules():
        if type(module).__name__ == "Linear4bit":
            deq.get_submodule(name).weight.data.copy_(dequantize(from_bnb(module), torch.float32))
    for model in (copy.deepcopy(q), fastlora.patch(copy.deepcopy(q), r=2, alpha=4)):
        est = fastlora.estimate_gradient(model, data, progress=False)
        ref = _autograd_grads(deq, list(est), data)
        assert len(est) == 14
        for n in est:
            assert relerr(est[n], ref[n]) < 1e-5, n
        # the 4-bit weights were never touched
        assert all(not p.requires_grad and p.grad is None for p in model.parameters() if p.dtype == torch.uint8)


def test_offload_cpu_gives_identical_estimate():
    base = tiny_llama()
    data = token_batches(3)
    plain = fastlora.estimate_gradient(base, data, progress=False)
    host = fastlora.estimate_gradient(base, data, offload="cpu", progress=False)
    for n in plain:
        torch.testing.assert_close(host[n], plain[n], rtol=1e-6, atol=1e-7)


def test_block_offload_schedule_and_identical_estimate():
    base = tiny_llama(num_hidden_layers=4)
    data = token_batches(3)
    plain = fastlora.estimate_gradient(base, data, progress=False)
    model = fastlora.patch(copy.deepcopy(base), r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # On the CPU the offloader runs its schedule with plain copies; poisoning every evicted copy
    # with NaN makes any use of a stale block copy (e.g. a saved weight kept past eviction) fail.
    off = BlockOffloader(model, device="cpu", poison_evicted=True)
    assert len(off.blocks) == 4 and off.blocks == find_blocks(model)
    est = fastlora.estimate_gradient(model, data, offload=off, progress=False)
    for n in plain:
        torch.testing.assert_close(est[n], plain[n], rtol=1e-5, atol=1e-7)
    # first + current + prefetched at most. Moves: the middle blocks twice per batch (forward and
    # backward), the last once per batch (kept for backward), the first once in all.
    assert off.max_resident <= 3
    n_blocks, n_batches = 4, 3
    assert off.loads == 1 + n_batches * ((n_blocks - 2) * 2 + 1)
    assert off.resident() == []
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n].detach(), p), n


def test_block_offload_refuses_4bit_and_modules_without_blocks():
    q = quantize_model_bnb(tiny_llama())
    with pytest.raises(ValueError, match="float models"):
        fastlora.estimate_gradient(q, token_batches(1), offload="blocks", device="cpu", progress=False)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match="_no_split_modules"):
        fastlora.estimate_gradient(
            seq, [torch.randn(2, 4)], offload="blocks", device="cpu", loss_fn=lambda m, b: m(b).sum(), progress=False
        )


@pytest.mark.parametrize("workers", [1, 3])
def test_host_accumulator_worker_backpressure_and_errors(workers):
    shapes = {"a": (3, 5), "b": (4, 5), "c": (2, 5)}
    acc = HostAccumulator(shapes, max_inflight=1, workers=workers)
    dense = DenseAccumulator(shapes)
    try:
        for _i in range(20):
            x = torch.randn(7, 5)
            for name, (n_out, _) in shapes.items():
                dy = torch.randn(7, n_out)
                acc.add(name, x, dy)
                dense.add(name, x, dy)
        acc.flush()
        for name in shapes:
            torch.testing.assert_close(acc.state()[name], dense.state()[name], rtol=1e-5, atol=1e-5)
        assert acc.updates == {"a": 20, "b": 20, "c": 20}
        acc.add("a", torch.randn(7, 5), torch.randn(7, 4))  # wrong shape: fails in the worker
        with pytest.raises(RuntimeError, match="host gradient accumulation failed"):
            acc.flush()
    finally:
        acc.close()


def test_outer_fp32_bf16_inputs():
    x, dy = torch.randn(33, 7), torch.randn(33, 5)
    out = outer_fp32(dy.bfloat16(), x.bfloat16())
    assert out.dtype == torch.float32
    ref = dy.bfloat16().double().t() @ x.bfloat16().double()
    assert relerr(out, ref) < 1e-6


def test_estimate_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no batch"):
        fastlora.estimate_gradient(model, [], progress=False)
    with pytest.raises(ValueError, match="no batch"):
        fastlora.estimate_gradient(model, iter(()), progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        fastlora.estimate_gradient(model, [torch.zeros(2, 3, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="labels"):
        fastlora.estimate_gradient(model, [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], progress=False)
    with pytest.raises(ValueError, match="offload"):
        fastlora.estimate_gradient(model, token_batches(1), offload="disk", progress=False)

    # a gradient that overflows in one layer only (its weight is zero, its input huge): the error
    # names that layer
    class Overflow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fine, self.huge = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
            torch.nn.init.zeros_(self.huge.weight)

        def forward(self, x):
            return self.fine(x) + self.huge(x * 1e37)

    with pytest.raises(ValueError, match=r"layer 'huge' has NaN/inf"):
        fastlora.estimate_gradient(
            Overflow(), [torch.ones(64, 4)], loss_fn=lambda m, b: m(b).sum(), target_modules=["fine", "huge"],
            progress=False,
        )  # fmt: skip

    # a target the loss never reaches
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="unused"):
        fastlora.estimate_gradient(Two(), [torch.randn(2, 4)], loss_fn=lambda m, b: m(b).sum(), progress=False)


def test_estimate_custom_loss_and_progress_bar(capsys):
    pytest.importorskip("tqdm")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(3)]

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(m(x), y)

    est = fastlora.estimate_gradient(model, data, loss_fn=loss_fn, target_modules=["0", "2"], progress=True)
    err = capsys.readouterr().err
    assert "estimating gradients" in err
    ref = copy.deepcopy(model)
    for x, y in data:
        loss_fn(ref, (x, y)).backward()
    torch.testing.assert_close(est["0"], ref[0].weight.grad / 3)
    torch.testing.assert_close(est["2"], ref[2].weight.grad / 3)


def test_gradient_estimate_save_load(tmp_path):
    est = fastlora.estimate_gradient(tiny_llama(), token_batches(1), progress=False)
    est.save(tmp_path / "g.safetensors")
    back = fastlora.GradientEstimate.load(tmp_path / "g.safetensors")
    assert back.num_batches == 1 and set(back) == set(est)
    for n in est:
        assert torch.equal(back[n], est[n])


_DIST_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import fastlora
    rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(5)]
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
    mine = data[rank::world]  # uneven on purpose: 3 batches and 2
    est = fastlora.estimate_gradient(model, mine, loss_fn=loss_fn, target_modules=["0", "2"], offload=sys.argv[3] or None, progress=False)
    if rank == 0:
        torch.save({"dist": dict(est), "n": est.num_batches, "data": data}, out)
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("offload", ["", "cpu"])
def test_distributed_two_gloo_ranks_equal_one_process_on_union(tmp_path, offload):
    out = tmp_path / "out.pt"
    run_two_ranks(_DIST_WORKER, [str(out), str(tmp_path / "rendezvous"), offload], tmp_path, timeout=120)
    res = torch.load(out, weights_only=False)
    assert res["n"] == 5
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    single = fastlora.estimate_gradient(
        model,
        res["data"],
        loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        target_modules=["0", "2"],
        progress=False,
    )
    for n in single:
        torch.testing.assert_close(res["dist"][n], single[n], rtol=1e-5, atol=1e-7)


# -- init formulas -------------------------------------------------------------------------------------


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


# -- patch(method="lora_ga") ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_patch_lora_ga_starts_equal_to_base_float(direction):
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), direction=direction, progress=False
    )
    layers = fastlora.lora_layers(model)
    assert all(layer.offset_in_base and layer.lora_A0 is not None for layer in layers.values())
    assert all(layer.lora_B.abs().max() > 0 for layer in layers.values())
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=1e-5, atol=1e-5)
    # the base weight carries the offset, exactly W0 - s·B0·A0 (fp32)
    name = "model.layers.0.self_attn.q_proj"
    layer = layers[name]
    w0 = base.get_submodule(name).weight
    torch.testing.assert_close(
        layer.base_layer.weight, w0 - layer.scaling * layer.lora_B0 @ layer.lora_A0, rtol=0, atol=1e-6
    )


def test_patch_lora_ga_nf4_frozen_offset_exact_start():
    base = quantize_model_bnb(tiny_llama())
    ids = torch.randint(0, 96, (2, 12))
    packed_before = {n: m.weight.data.clone() for n, m in base.named_modules() if type(m).__name__ == "Linear4bit"}
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), progress=False)
    layers = fastlora.lora_layers(model)
    for name, layer in layers.items():
        assert layer.is_quantized and not layer.offset_in_base and layer.lora_A0 is not None
        assert torch.equal(layer.base_layer.weight.data, packed_before[name])  # never re-quantised
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=1e-5, atol=1e-5)


def test_patch_lora_ga_weights_scale_and_precomputed_grads():
    base = tiny_llama()
    data = token_batches(2)
    est = fastlora.estimate_gradient(base, data, progress=False)
    a = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, grads=est, scale="weightS", svd="exact")
    b = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, scale="weightS", svd="exact")
    for (na, la), (nb, lb) in zip(fastlora.lora_layers(a).items(), fastlora.lora_layers(b).items()):
        assert na == nb
        # the same subspaces (signs of singular vectors may differ between runs)
        torch.testing.assert_close(lb.lora_B @ lb.lora_A, la.lora_B @ la.lora_A, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize(
    "quantized,use_rslora", [(False, False), (False, True), (True, False)], ids=["fp32", "fp32-rslora", "nf4"]
)
def test_saved_delta_loads_in_peft_and_reproduces_trained_logits(tmp_path, quantized, use_rslora):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    if quantized:
        base = quantize_model_bnb(base)
    # PEFT gets a pristine copy: bnb 0.50 on the CPU may repack a 4-bit weight after a forward.
    peft_base = copy.deepcopy(base)
    data = token_batches(3)
    ids = torch.randint(0, 96, (2, 12))
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, use_rslora=use_rslora, data=data, progress=False
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in data:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = _logits(model, ids)
    assert (trained - _logits(base, ids)).abs().max() > 1e-3  # training changed something
    out = fastlora.save_adapter(model, tmp_path / "ga")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8  # rank 2r: [B, -B0]·[A; A0]
    assert cfg["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if use_rslora else 2))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(peft_base, str(out))  # onto the *original* base
    # train mode (dropout is 0): in eval + no_grad, bnb 0.50's CPU Linear4bit repacks the weight for a
    # bf16 AVX512 kernel, whose rounding (~1e-3) is bnb's, not the adapter's.
    pm.train()
    torch.testing.assert_close(_logits(pm, ids), trained, rtol=1e-4, atol=1e-4)


def test_lora_ga_errors_leave_model_unpatched():
    base = tiny_llama()
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="data="):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8)
    assert not fastlora.lora_layers(model)
    with pytest.raises(ValueError, match="direction"):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8, data=token_batches(1), direction="BrAr")
    with pytest.raises(ValueError, match="scale"):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8, data=token_batches(1), scale="huge")
    with pytest.raises(ValueError, match="2r singular vectors"):
        fastlora.patch(model, method="lora_ga", r=20, alpha=8, data=token_batches(1))  # k_proj is 64 -> 32
    with pytest.raises(ValueError, match="grads has no entry"):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8, grads={})
    with pytest.raises(ValueError, match="re-quantise"):
        fastlora.patch(quantize_model_bnb(base), method="lora_ga", r=4, alpha=8, data=token_batches(1), offset="base")
    with pytest.raises(TypeError):
        fastlora.patch(model, method="lora_ga", r=4, alpha=8, data=token_batches(1), bogus=1)
    assert not fastlora.lora_layers(model)
    ids = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)


def test_unpatch_restores_base_and_merge_keeps_function():
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), progress=False)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.add_(0.01 * torch.randn_like(layer.lora_B))  # as if trained
    patched = _logits(model, ids)
    merged = fastlora.unpatch(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(_logits(merged, ids), patched, rtol=1e-5, atol=1e-5)
    restored = fastlora.unpatch(model)  # the in-place offset is added back: the original W0 returns
    for (n, p), (_, q) in zip(restored.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


# -- CUDA paths (run on the GPU machine; skipped in CPU CI) ---------------------------------------------


@pytest.mark.gpu
def test_cuda_host_accumulator_and_block_offload_match_plain():
    base = tiny_llama(num_hidden_layers=4)
    data = token_batches(3)
    plain = fastlora.estimate_gradient(copy.deepcopy(base).cuda(), data, progress=False)
    host = fastlora.estimate_gradient(copy.deepcopy(base).cuda(), data, offload="cpu", progress=False)
    model = fastlora.patch(copy.deepcopy(base), r=2, alpha=4)  # stays in host memory
    off = BlockOffloader(model, poison_evicted=True)
    blocks = fastlora.estimate_gradient(model, data, offload=off, progress=False)
    assert off.device.type == "cuda" and off.max_resident <= 3
    assert all(p.device.type == "cpu" for p in model.parameters())  # back in host memory
    for n in plain:
        assert plain[n].is_cuda and not host[n].is_cuda
        assert relerr(host[n], plain[n]) < 1e-6, n
        assert relerr(blocks[n], plain[n]) < 1e-5, n


@pytest.mark.gpu
def test_cuda_lora_ga_nf4_starts_equal_to_base():
    base = quantize_model_bnb(tiny_llama()).cuda()
    ids = torch.randint(0, 96, (2, 12), device="cuda")
    ref = _logits(base, ids)
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_resume_from_saved_adapter_keeps_frozen_half(tmp_path, use_rslora):
    base = tiny_llama()
    data = token_batches(3)
    ids = torch.randint(0, 96, (2, 12))
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, use_rslora=use_rslora, data=data, progress=False
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in data[:2]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    fastlora.save_adapter(model, tmp_path / "ckpt")
    at_ckpt = _logits(model, ids)

    resumed = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt")
    layers, trained = fastlora.lora_layers(resumed), fastlora.lora_layers(model)
    for name, layer in layers.items():
        assert layer.r == 4 and layer.lora_A0 is not None and not layer.offset_in_base
        assert layer.scaling == pytest.approx(trained[name].scaling)
        torch.testing.assert_close(layer.lora_A, trained[name].lora_A)
        torch.testing.assert_close(layer.lora_B0, trained[name].lora_B0)
    torch.testing.assert_close(_logits(resumed, ids), at_ckpt, rtol=1e-5, atol=1e-5)
    # one more SGD step on both: the same trainable parameters get the same update
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    for m, o in ((model, opt), (resumed, opt2)):
        m(**data[2]).loss.backward()
        o.step()
    torch.testing.assert_close(_logits(resumed, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)

    plain = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt", keep_frozen=False)  # as PEFT
    assert all(layer.r == 8 and layer.lora_A0 is None for layer in fastlora.lora_layers(plain).values())
    torch.testing.assert_close(_logits(plain, ids), at_ckpt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", ["cpu", "blocks"])
def test_patch_lora_ga_with_offload_end_to_end(offload):
    base = tiny_llama(num_hidden_layers=3)
    ids = torch.randint(0, 96, (2, 12))
    data = token_batches(2)
    ref = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, svd="exact", progress=False)
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, svd="exact", offload=offload, progress=False
    )
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(fastlora.lora_layers(model).items(), fastlora.lora_layers(ref).items()):
        torch.testing.assert_close(a.lora_B @ a.lora_A, b.lora_B @ b.lora_A, rtol=1e-4, atol=1e-6, msg=n)
