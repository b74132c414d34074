"""fastlora.lora_ga.offload: block streaming (schedule, identical estimate) and the ``offload``
argument resolved once: every combination works or is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import quantize_model_bnb, relerr, tiny_llama, token_batches

import fastlora
from fastlora.lora_ga import BlockOffloader, find_blocks


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


# -- the offload argument, resolved once ---------------------------------------------------------------------


def test_offload_combinations_work_or_are_refused():
    from fastlora.lora_ga import DenseAccumulator, resolve_offload
    from fastlora.lora_ga.targets import default_targets, target_shapes

    model = tiny_llama()
    data = token_batches(1)
    refused = [
        (dict(offload="disk"), "offload must be None, 'cpu', 'blocks' or a BlockOffloader"),
        (dict(offload=None, device="cpu"), "settings of offload='blocks'"),
        (dict(offload="cpu", blocks=["LlamaDecoderLayer"]), "settings of offload='blocks'"),
        (dict(offload=BlockOffloader(tiny_llama(), device="cpu")), "BlockOffloader of another model"),
        (dict(offload=BlockOffloader(model, device="cpu"), device="cpu"), "configured already"),
        (dict(accumulator=DenseAccumulator({}), offload="cpu"), "offload='cpu' puts the sums in host memory"),
        (dict(accumulator=DenseAccumulator({}), sketch=8), "pass one of them"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            fastlora.estimate_gradient(model, data, progress=False, **kwargs)
    # every accepted combination, dense and sketched, gives the plain result
    plain, plain_sk = (fastlora.estimate_gradient(model, data, sketch=s, passes=1, progress=False) for s in (None, 8))
    for offload in ("cpu", "blocks"):
        dense = fastlora.estimate_gradient(model, data, offload=offload, progress=False)
        sk = fastlora.estimate_gradient(model, data, offload=offload, sketch=8, passes=1, progress=False)
        for n in plain:
            torch.testing.assert_close(dense[n], plain[n], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(sk[n].dense(), plain_sk[n].dense(), rtol=1e-4, atol=1e-7)
    # offload="cpu" is not dropped on the sketch path: its sketches live in host memory
    targets = default_targets(model, "all-linear", None)
    plan = resolve_offload("cpu", model, sketch=True)
    assert plan.host_sums and plan.offloader is None
    assert set(plan.sum_devices(targets).values()) == {torch.device("cpu")}
    assert not resolve_offload(None, model, sketch=True).host_sums
    assert resolve_offload("blocks", model, sketch=False, device="cpu").host_sums  # dense sums leave the device
    assert len(target_shapes(targets)) == 14


def test_two_sketch_passes_stream_through_one_offloader(monkeypatch):
    """passes=2 with offload="blocks" builds (and pins) one BlockOffloader, used by both passes."""
    from fastlora.lora_ga import offload as offload_module

    base = tiny_llama(num_hidden_layers=3)
    data = token_batches(2)
    plain = fastlora.estimate_gradient(base, data, sketch=12, passes=2, progress=False)
    built = []
    real_init = offload_module.BlockOffloader.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(offload_module.BlockOffloader, "__init__", counting_init)
    est = fastlora.estimate_gradient(base, data, sketch=12, passes=2, offload="blocks", device="cpu", progress=False)
    assert len(built) == 1 and est.passes == 2
    n_blocks, n_batches = 3, 2  # per pass: the first block once, middle ones twice per batch, the last once
    assert built[0].loads == 2 * (1 + n_batches * ((n_blocks - 2) * 2 + 1))
    assert built[0].resident() == []
    for n in plain:
        assert relerr(est[n].dense(), plain[n].dense()) < 1e-4, n
    # a BlockOffloader given by the caller serves both passes too (its state is collected per entry)
    off = BlockOffloader(base, device="cpu", poison_evicted=True)
    est = fastlora.estimate_gradient(base, data, sketch=12, passes=2, offload=off, progress=False)
    assert off.max_resident <= 3 and len(off._slots) == n_blocks
    for n in plain:
        assert relerr(est[n].dense(), plain[n].dense()) < 1e-4, n


@pytest.mark.gpu
def test_cuda_sketch_with_host_sums_and_blocks():
    """On CUDA, offload="cpu" puts a sketch's sums in host memory and "blocks" streams a host model;
    both give the sketch of the plain on-device run."""
    base = tiny_llama(num_hidden_layers=3)
    data = token_batches(2)
    plain = fastlora.estimate_gradient(copy.deepcopy(base).cuda(), data, sketch=12, passes=2, progress=False)
    host = fastlora.estimate_gradient(
        copy.deepcopy(base).cuda(), data, sketch=12, passes=2, offload="cpu", progress=False
    )
    blocks = fastlora.estimate_gradient(
        copy.deepcopy(base), data, sketch=12, passes=2, offload="blocks", progress=False
    )
    for n in plain:
        assert plain[n].U.is_cuda and not host[n].U.is_cuda and blocks[n].U.is_cuda
        assert relerr(host[n].dense(), plain[n].dense()) < 1e-4, n
        assert relerr(blocks[n].dense(), plain[n].dense()) < 1e-4, n
