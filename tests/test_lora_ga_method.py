"""fastlora.lora_ga.method: ``patch(method="lora_ga")`` end to end (float, NF4, offload), saving the
delta as a PEFT adapter, resuming, unpatching, and its errors.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import logits, quantize_model_bnb, tiny_llama, token_batches

import fastlora


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
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)
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
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)


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
    trained = logits(model, ids)
    assert (trained - logits(base, ids)).abs().max() > 1e-3  # training changed something
    out = fastlora.save_adapter(model, tmp_path / "ga")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8  # rank 2r: [B, -B0]·[A; A0]
    assert cfg["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if use_rslora else 2))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(peft_base, str(out))  # onto the *original* base
    # train mode (dropout is 0): in eval + no_grad, bnb 0.50's CPU Linear4bit repacks the weight for a
    # bf16 AVX512 kernel, whose rounding (~1e-3) is bnb's, not the adapter's.
    pm.train()
    torch.testing.assert_close(logits(pm, ids), trained, rtol=1e-4, atol=1e-4)


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
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)


def test_unpatch_restores_base_and_merge_keeps_function():
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), progress=False)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.add_(0.01 * torch.randn_like(layer.lora_B))  # as if trained
    patched = logits(model, ids)
    merged = fastlora.unpatch(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(logits(merged, ids), patched, rtol=1e-5, atol=1e-5)
    restored = fastlora.unpatch(model)  # the in-place offset is added back: the original W0 returns
    for (n, p), (_, q) in zip(restored.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.gpu
def test_cuda_lora_ga_nf4_starts_equal_to_base():
    base = quantize_model_bnb(tiny_llama()).cuda()
    ids = torch.randint(0, 96, (2, 12), device="cuda")
    ref = logits(base, ids)
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=token_batches(2), progress=False)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)


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
    at_ckpt = logits(model, ids)

    resumed = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt")
    layers, trained = fastlora.lora_layers(resumed), fastlora.lora_layers(model)
    for name, layer in layers.items():
        assert layer.r == 4 and layer.lora_A0 is not None and not layer.offset_in_base
        assert layer.scaling == pytest.approx(trained[name].scaling)
        torch.testing.assert_close(layer.lora_A, trained[name].lora_A)
        torch.testing.assert_close(layer.lora_B0, trained[name].lora_B0)
    torch.testing.assert_close(logits(resumed, ids), at_ckpt, rtol=1e-5, atol=1e-5)
    # one more SGD step on both: the same trainable parameters get the same update
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    for m, o in ((model, opt), (resumed, opt2)):
        m(**data[2]).loss.backward()
        o.step()
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), rtol=1e-4, atol=1e-4)

    plain = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt", keep_frozen=False)  # as PEFT
    assert all(layer.r == 8 and layer.lora_A0 is None for layer in fastlora.lora_layers(plain).values())
    torch.testing.assert_close(logits(plain, ids), at_ckpt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", ["cpu", "blocks"])
def test_patch_lora_ga_with_offload_end_to_end(offload):
    base = tiny_llama(num_hidden_layers=3)
    ids = torch.randint(0, 96, (2, 12))
    data = token_batches(2)
    ref = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, svd="exact", progress=False)
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, svd="exact", offload=offload, progress=False
    )
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(fastlora.lora_layers(model).items(), fastlora.lora_layers(ref).items()):
        torch.testing.assert_close(a.lora_B @ a.lora_A, b.lora_B @ b.lora_A, rtol=1e-4, atol=1e-6, msg=n)


def test_half_precision_base_keeps_the_offset_exact():
    """offset="auto" on a bf16/fp16 W0 keeps the frozen term: the init equals the base (subtracting in
    place would round W0: ~1e-2 off in bf16) and unpatch gives W0 back bit for bit."""
    base = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 12))
    data = token_batches(1)
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, progress=False)
    assert all(not la.offset_in_base and la.lora_A0 is not None for la in fastlora.lora_layers(model).values())
    ref = logits(base, ids).double()
    # The fused gated MLP rounds act(gate)·up to bf16 once where the model's own MLP rounds twice, so
    # the init is compared with a zero LoRA through the same fused blocks; per layer, with the base.
    zero = fastlora.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    assert torch.equal(logits(model, ids), logits(zero, ids))
    per_layer = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, progress=False, fuse_blocks=False
    )
    assert torch.equal(logits(per_layer, ids).double(), ref)
    in_place = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=4, alpha=8, data=data, offset="base", progress=False
    )  # what "auto" did before: measurably off
    assert float((logits(in_place, ids).double() - ref).norm() / ref.norm()) > 1e-4
    for (n, p), (_, q) in zip(fastlora.unpatch(model).named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
    # an fp32 base is still offset in place (rounding ~1e-7): no rank-2r op in training
    model32 = fastlora.patch(copy.deepcopy(tiny_llama()), method="lora_ga", r=4, alpha=8, data=data, progress=False)
    assert all(la.offset_in_base for la in fastlora.lora_layers(model32).values())
