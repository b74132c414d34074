"""Bad input gets a clear error naming the module and the fix, and leaves the model unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_llama

import fastlora


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_module_matched():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        fastlora.patch(model, target_modules=["nonexistent"])
    assert not fastlora.lora_layers(model)


@pytest.mark.parametrize("r", [0, -1, 65, 2.5])
def test_bad_rank(r):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"r=.* does not fit layer model\.layers\.0\.self_attn\.q_proj"):
        fastlora.patch(model, r=r)
    assert not fastlora.lora_layers(model) and _same(before, _state(model))
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the failed patch


def test_unsupported_layer_named():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"'model\.embed_tokens', a Embedding.*exclude="):
        fastlora.patch(model, target_modules=["embed_tokens", "q_proj"])
    assert not fastlora.lora_layers(model)


def test_patching_twice():
    model = fastlora.patch(tiny_llama(), r=2)
    with pytest.raises(RuntimeError, match=r"already patched.*unpatch"):
        fastlora.patch(model, r=2)
    # LoraLinear exposes its base's weight/bias (as PEFT's layer does) but is never taken for a linear layer
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is q.base_layer.weight and q.bias is None
    assert not fastlora.patching.is_supported_linear(q)
    fastlora.unpatch(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fastlora.patch(tiny_llama(), method="nope")


def test_bad_regex():
    with pytest.raises(ValueError, match="not a valid regex"):
        fastlora.patch(tiny_llama(), target_modules="(unclosed")


def test_save_unpatched(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA layers.*fastlora\.patch"):
        fastlora.save_adapter(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dtype_mismatch_names_module():
    model = fastlora.patch(tiny_llama(), r=2)
    with pytest.raises(
        TypeError, match=r"model\.layers\.0\.self_attn\.q_proj has torch\.float32 weights.*torch\.bfloat16"
    ):
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 64, dtype=torch.bfloat16))


def test_load_adapter_wrong_shapes_changes_nothing(tmp_path):
    other = fastlora.patch(tiny_llama(hidden_size=32, intermediate_size=64), r=2)
    fastlora.save_adapter(other, tmp_path / "other")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"shapes do not fit .*trained on another model"):
        fastlora.load_adapter(model, tmp_path / "other")
    assert not fastlora.lora_layers(model) and _same(before, _state(model))
    assert all(p.requires_grad for p in model.parameters())


def test_load_adapter_missing_module(tmp_path):
    deep = fastlora.patch(tiny_llama(num_hidden_layers=3), r=2)
    fastlora.save_adapter(deep, tmp_path / "deep")
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"targets 'model\.layers\.2\..*', which this model does not have"):
        fastlora.load_adapter(model, tmp_path / "deep")
    assert not fastlora.lora_layers(model)


def test_load_adapter_not_lora(tmp_path):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="'IA3' adapter"):
        fastlora.load_adapter(tiny_llama(), tmp_path / "ia3")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        fastlora.load_adapter(tiny_llama(), tmp_path / "missing")


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND='bogus'"):
        fastlora.get_backend()
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    assert fastlora.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        fastlora.set_backend("cuda")
    model = fastlora.patch(copy.deepcopy(tiny_llama()), r=2)
    ids = torch.randint(0, 96, (1, 4))
    assert model(input_ids=ids).logits.isfinite().all()


def test_rank_fitting_some_layers_only_changes_nothing():
    """r=40 fits q_proj (64->64) but not k_proj (64->32): the layers built before the error are undone."""
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"r=40 does not fit layer model\.layers\.0\.self_attn\.k_proj \(64->32\)"):
        fastlora.patch(model, r=40)
    assert not fastlora.lora_layers(model) and _same(before, _state(model))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("r", [True, False, np.int64(0), "4", None])
def test_rank_must_be_a_true_positive_int(r):
    with pytest.raises(
        ValueError, match=r"r=.* does not fit layer .*q_proj \(64->64\); r must be a whole number with 1 <= r <= 64"
    ):
        fastlora.patch(tiny_llama(), r=r)


def test_numpy_rank_accepted():
    model = fastlora.patch(tiny_llama(), r=np.int64(4), alpha=np.float32(8))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.r) is int and layer.r == 4 and layer.lora_A.shape == (4, 64) and layer.scaling == 2.0


@pytest.mark.parametrize("alpha", [-8, 0, float("nan"), float("inf"), True, "8"])
def test_alpha_must_be_positive_finite(alpha):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"alpha=.* for layer model\.layers\.0\.self_attn\.q_proj must be a positive"):
        fastlora.patch(model, r=2, alpha=alpha)
    assert not fastlora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_wrong_input_width_names_layer():
    model = fastlora.patch(tiny_llama(), r=4)
    with pytest.raises(
        ValueError, match=r"layer model\.layers\.0\.mlp\.down_proj \(128->64\) expects inputs of width 128.*\(2, 63\)"
    ):
        model.model.layers[0].mlp.down_proj(torch.randn(2, 63))


@fastlora.register_method("_test_raises")
def _init_raises(model, layers, **kwargs):
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B)
    raise RuntimeError("init failed")


@pytest.mark.parametrize(
    ("method", "kwargs", "error"), [("_test_raises", {}, RuntimeError), ("lora_ga", {"data": []}, Exception)]
)
def test_failed_init_method_leaves_model_as_it_was(method, kwargs, error):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice survives too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _state(model)
    structure = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(error):
        fastlora.patch(model, method=method, r=2, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == structure and _same(before, _state(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "save_pretrained" not in vars(model)
