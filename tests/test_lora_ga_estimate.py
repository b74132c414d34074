"""fastlora.lora_ga.estimate: the streaming gradient estimate (plain, NF4, host sums, distributed) and
its input checks.

Everything runs on the CPU on tiny models built from configs; references are autograd gradients
(float64 where the check is exact).
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from helpers import quantize_model_bnb, relerr, run_two_ranks, tiny_gpt2, tiny_llama, token_batches

import fastlora
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


# -- bad input: each error names fastlora.estimate_gradient and the fix ----------------------------------------


def test_data_none_or_a_single_batch_is_refused_clearly():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"estimate_gradient: data is None; pass an iterable of batches"):
        fastlora.estimate_gradient(model, None, progress=False)
    batch = token_batches(1)[0]
    with pytest.raises(TypeError, match=r"data is a single batch \(a dict with keys \['input_ids', 'labels'\]\)"):
        fastlora.estimate_gradient(model, batch, progress=False)
    with pytest.raises(TypeError, match=r"data is one Tensor"):
        fastlora.estimate_gradient(model, batch["input_ids"], loss_fn=lambda m, b: m(b).logits.sum(), progress=False)
    with pytest.raises(TypeError, match="data must be an iterable of batches, got int"):
        fastlora.estimate_gradient(model, 3, progress=False)
    with pytest.raises(ValueError, match=r"data= .* or grads="):  # the patch method says it in its own words
        fastlora.patch(copy.deepcopy(model), method="lora_ga", r=2, alpha=4, progress=False)


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_progress_bar_total_is_the_number_of_batches_or_unknown(monkeypatch, kind):
    import tqdm.auto

    totals = []
    real = tqdm.auto.tqdm

    def recording(iterable, total=None, **kw):
        totals.append(total)
        return real(iterable, total=total, disable=True, **kw)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    data = token_batches(4)
    est = fastlora.estimate_gradient(tiny_llama(), data if kind == "list" else (b for b in data), progress=True)
    assert est.num_batches == 4
    assert totals == [4 if kind == "list" else None]  # never the iters limit (64) of a 4-batch generator


def test_integer_input_to_a_target_layer_gets_the_right_advice():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    ids = [torch.randint(0, 4, (2, 4))]
    for m in (model, fastlora.patch(copy.deepcopy(model), r=1, alpha=1, target_modules=["0"])):
        with pytest.raises(TypeError, match=r"layer '0' got torch.int64 input; .*Token ids go to the model") as info:
            fastlora.estimate_gradient(
                m, ids, loss_fn=lambda mod, b: mod(b).sum(), target_modules=["0"], progress=False
            )
        assert "model.to(torch.int64)" not in str(info.value)
    # outside the estimate, the patched layer itself says the same
    with pytest.raises(TypeError, match=r"layer 0 got torch.int64 input; a linear layer takes float") as info:
        fastlora.lora_layers(m)["0"](ids[0])
    assert "model.to(" not in str(info.value)


def test_empty_dataloader_error_names_the_fix():
    loader = torch.utils.data.DataLoader(list(range(3)), batch_size=4, drop_last=True)
    assert len(loader) == 0
    with pytest.raises(ValueError, match=r"estimate_gradient: data yielded no batch.*drop_last=True"):
        fastlora.estimate_gradient(tiny_llama(), loader, progress=False)


def test_nan_loss_error_names_the_batch():
    data = token_batches(3)
    ids = data[1]["input_ids"]
    data[1] = {"input_ids": ids, "labels": torch.full_like(ids, -100)}  # no label: a 0/0 mean loss, zero gradient
    assert torch.isnan(tiny_llama()(**data[1]).loss)
    for sketch in (None, 8):  # dense and sketched: the batch is named, not silently averaged in
        with pytest.raises(ValueError, match=r"estimate_gradient: the loss of batch 1 \(0-based\) is NaN.*-100"):
            fastlora.estimate_gradient(tiny_llama(), data, sketch=sketch, progress=False)
