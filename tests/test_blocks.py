"""Grouped LoRA ops (q/k/v as one op, the gated MLP as one op) and the block detection of ``patch``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quantize_model_bnb, relerr, tiny_gpt2, tiny_llama, token_batches
from torch import nn

import fastlora
from fastlora import LoraLinear, grouped
from fastlora.blocks import fused_blocks
from fastlora.grouped import act_mul, act_mul_backward, gated_mlp, grouped_linear

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------
# op level: grouped members against the very same LoraLinear layers run one by one
# ------------------------------------------------------------------------------------------------
def _layers(
    k: int,
    outs: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    *,
    bias: bool = False,
    frozen: bool = False,
    dropout: float = 0.0,
    quant: bool = False,
    seed: int = 0,
) -> list[LoraLinear]:
    """One LoraLinear per output width, each with its own rank and alpha, B ≠ 0."""
    torch.manual_seed(seed)
    bases = nn.ModuleList([nn.Linear(k, n, bias=bias) for n in outs])
    if quant:
        bases = quantize_model_bnb(bases)
    layers = []
    for i, (base, r) in enumerate(zip(bases, ranks)):
        if not quant:
            base = base.to(dtype)
        layer = LoraLinear(base, r, lora_alpha=2.0 * r + i, dropout=dropout, name=f"m{i}")
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
        if frozen:
            layer.set_frozen_offset(torch.randn(r, k) * 0.3, torch.randn(n := layer.out_features, r) * 0.3)
            assert n == outs[i]
        layers.append(layer)
    return layers


@pytest.fixture(params=[True, False], ids=["fold", "nofold"])
def fold(request, monkeypatch):
    """Both forwards of a grouped op: the LoRA term folded into the base GEMM, or added per member."""
    monkeypatch.setattr(grouped, "FOLD_FORWARD", request.param)
    return request.param


def _grads(layers, x, outs):
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in outs)
    params = [x] + [p for m in layers for p in (m.lora_A, m.lora_B)]
    return torch.autograd.grad(loss, params)


def _check_grouped(layers, x, seed: int | None = None):
    """grouped_linear against the same layers called one by one (same RNG state): outputs and every
    gradient (x, each A, each B), fp32-tight. Returns the grouped outputs."""
    if seed is not None:
        torch.manual_seed(seed)
    ref_out = [m(x) for m in layers]
    ref = _grads(layers, x, ref_out)
    if seed is not None:
        torch.manual_seed(seed)
    out = grouped_linear(x, layers)
    got = _grads(layers, x, out)
    for o, r in zip(out, ref_out):
        assert o.shape == r.shape and relerr(o, r) < 1e-6
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-5
    return out, ref_out


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_fp32_equals_per_layer(bias, frozen, fold):
    layers = _layers(40, (48, 16, 16), (4, 2, 8), torch.float32, bias=bias, frozen=frozen)
    _check_grouped(layers, torch.randn(3, 5, 40, requires_grad=True))


def _fp64_outputs(layers, x64):
    """The grouped function in float64 from the layers' own weights: the ground truth."""
    outs = []
    for m in layers:
        w = m.dense_base_weight(torch.float64)
        y = x64 @ w.t() + m.scaling * (x64 @ m.lora_A.double().t()) @ m.lora_B.double().t()
        if m.lora_A0 is not None:
            y = y - m.scaling * (x64 @ m.lora_A0.double().t()) @ m.lora_B0.double().t()
        if m.base_layer.bias is not None:
            y = y + m.base_layer.bias.double()
        outs.append(y)
    return outs


@pytest.mark.parametrize("quant", [False, True])
def test_grouped_bf16_vs_float64(quant, fold):
    layers = _layers(64, (64, 32, 32), (4, 4, 8), torch.bfloat16, frozen=True, quant=quant)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if quant else torch.autocast("cpu", enabled=False):
        out = grouped_linear(x, layers)
    assert all(o.dtype == torch.bfloat16 for o in out)
    got = _grads(layers, x, out)
    x64 = x.detach().double().requires_grad_(True)
    ab64 = [
        (m.lora_A.detach().double().requires_grad_(True), m.lora_B.detach().double().requires_grad_(True))
        for m in layers
    ]
    ref_out = []
    for m, (a64, b64) in zip(layers, ab64):
        y = x64 @ m.dense_base_weight(torch.float64).t() + m.scaling * (x64 @ a64.t()) @ b64.t()
        ref_out.append(y - m.scaling * (x64 @ m.lora_A0.double().t()) @ m.lora_B0.double().t())
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=torch.float64)).sum() for o in ref_out)
    ref = torch.autograd.grad(loss, [x64] + [t for ab in ab64 for t in ab])
    for o, r in zip(out, ref_out):
        assert relerr(o, r) < 1e-2
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-2


def test_grouped_nf4_equals_per_layer(fold):
    layers = _layers(64, (64, 32, 32), (4, 2, 8), torch.float32, bias=True, quant=True)
    assert all(m.is_quantized for m in layers)
    x = torch.randn(6, 64, requires_grad=True)
    out, _ = _check_grouped(layers, x)
    for o, r in zip(out, _fp64_outputs(layers, x.detach().double())):
        assert relerr(o, r) < 1e-5


def test_grouped_dropout_equals_per_layer_same_seed():
    """Each member draws its own seed from torch's RNG in call order, as LoraLinear does: the same
    elements are dropped, so the outputs and gradients agree with the per-layer run exactly."""
    layers = _layers(40, (24, 8, 8), (4, 2, 3), torch.float32, dropout=0.3)
    for m in layers:
        m.train()
    x = torch.randn(7, 40, requires_grad=True)
    _, ref_out = _check_grouped(layers, x, seed=123)
    torch.manual_seed(124)  # another seed: another mask
    assert relerr(grouped_linear(x, layers)[0], ref_out[0]) > 1e-3


def _mlp_layers(k, f, dtype, **kw):
    gate_up = _layers(k, (f, f), (4, 2), dtype, **kw)
    down = _layers(f, (k,), (8,), dtype, seed=1, **{a: b for a, b in kw.items() if a != "frozen"})[0]
    return gate_up, down


def _mlp_per_layer(x, gate_up, down, kind):
    act = nn.SiLU() if kind == "silu" else nn.GELU(approximate="tanh")
    if len(gate_up) == 2:
        return down(act(gate_up[0](x)) * gate_up[1](x))
    g, u = gate_up[0](x).chunk(2, dim=-1)
    return down(act(g) * u)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("variant", ["plain", "frozen", "dropout", "nf4", "phi3"])
def test_gated_mlp_equals_per_layer(kind, variant, fold):
    k, f = 64, 96
    if variant == "phi3":
        gate_up = _layers(k, (2 * f,), (4,), torch.float32)
        down = _layers(f, (k,), (8,), torch.float32, seed=1)[0]
    else:
        kw = {"frozen": variant == "frozen", "dropout": 0.25 if variant == "dropout" else 0.0}
        if variant == "nf4":
            kw["quant"] = True
            f = 128
        gate_up, down = _mlp_layers(k, f, torch.float32, **kw)
    layers = [*gate_up, down]
    for m in layers:
        m.train()
    x = torch.randn(2, 5, k, requires_grad=True)
    torch.manual_seed(7)
    ref_out = _mlp_per_layer(x, gate_up, down, kind)
    ref = _grads(layers, x, [ref_out])
    torch.manual_seed(7)
    out = gated_mlp(x, gate_up, down, kind)
    got = _grads(layers, x, [out])
    assert out.shape == ref_out.shape
    assert relerr(out, ref_out) < 1e-6
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-5


def test_gated_mlp_bf16_vs_float64():
    gate_up, down = _mlp_layers(64, 128, torch.bfloat16, frozen=True, quant=True)
    layers = [*gate_up, down]
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_mlp(x, gate_up, down, "silu")
    assert out.dtype == torch.bfloat16
    got = _grads(layers, x, [out])
    # float64 twin: the same layers with every tensor upcast
    twin = copy.deepcopy(layers)
    for m in twin:
        w = m.dense_base_weight(torch.float64)
        m.base_layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
        m.base_layer.weight.data.copy_(w)
        m.base_layer.requires_grad_(False)
        m.to(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    ref_out = _mlp_per_layer(x64, twin[:2], twin[2], "silu")
    ref = _grads(twin, x64, [ref_out])
    assert relerr(out, ref_out) < 1e-2
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-2


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_activation_triton_kernels_match_torch(kind):
    """The elementwise Triton kernels the CUDA path uses (here in Triton's interpreter)."""
    pytest.importorskip("triton")
    eu = torch.randn(5, 2 * 37) * 3
    dh = torch.randn(5, 37)
    h_t = act_mul(eu, kind, use_triton=True)
    h_r = act_mul(eu, kind, use_triton=False)
    assert relerr(h_t, h_r) < 1e-6
    h2_t, deu_t = act_mul_backward(dh.clone(), eu, kind, use_triton=True)
    h2_r, deu_r = act_mul_backward(dh.clone(), eu, kind, use_triton=False)
    assert relerr(h2_t, h_r) < 1e-6 and relerr(h2_r, h_r) < 1e-6
    assert relerr(deu_t, deu_r) < 1e-5
    # against autograd of the plain formula
    e, u = eu[:, :37].clone().requires_grad_(True), eu[:, 37:].clone().requires_grad_(True)
    act = nn.SiLU() if kind == "silu" else nn.GELU(approximate="tanh")
    (act(e) * u * dh).sum().backward()
    assert relerr(deu_r, torch.cat([e.grad, u.grad], dim=1)) < 1e-5


# ------------------------------------------------------------------------------------------------
# model level: detection, equality with fuse_blocks=False, training, save/load, compile
# ------------------------------------------------------------------------------------------------
def _tiny(arch: str, **kw):
    import transformers as tf

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    common.update(kw)
    cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }[arch]
    if arch.startswith("gemma"):
        common["head_dim"] = 16
    if arch == "qwen3":
        common["head_dim"] = 16
    if arch == "phi3":
        common["pad_token_id"] = 0
    torch.manual_seed(0)
    return getattr(tf, cls[1])(getattr(tf, cls[0])(**common)).eval()


def _pair(model, **kw):
    """(grouped, per-layer) patched copies of ``model`` with the same A and a nonzero B."""
    a = fastlora.patch(copy.deepcopy(model), **kw)
    b = fastlora.patch(copy.deepcopy(model), fuse_blocks=False, **kw)
    torch.manual_seed(1)
    with torch.no_grad():
        for la, lb in zip(fastlora.lora_layers(a).values(), fastlora.lora_layers(b).values()):
            la.lora_B.normal_(0, 0.05)
            lb.lora_A.copy_(la.lora_A)
            lb.lora_B.copy_(la.lora_B)
    return a, b


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: (m.lora_A.grad, m.lora_B.grad) for n, m in fastlora.lora_layers(model).items()}


def _assert_same(a, b, batch, tol=1e-5):
    la, ga = _loss_and_grads(a, batch)
    lb, gb = _loss_and_grads(b, batch)
    assert abs(la.item() - lb.item()) <= tol * abs(lb.item())
    assert set(ga) == set(gb)
    for n in ga:
        assert relerr(ga[n][0], gb[n][0]) < tol * 10, n
        assert relerr(ga[n][1], gb[n][1]) < tol * 10, n


@pytest.mark.parametrize(
    "arch,expect",
    [
        ("llama", {"qkv", "gated_mlp"}),
        ("mistral", {"qkv", "gated_mlp"}),
        ("qwen2", {"qkv", "gated_mlp"}),
        ("qwen3", {"qkv", "gated_mlp"}),
        ("gemma", {"qkv", "gated_mlp"}),
        ("gemma2", {"qkv", "gated_mlp"}),
        ("phi3", {"gated_mlp"}),  # q/k/v is already one layer (qkv_proj)
    ],
)
def test_detection_and_equality(arch, expect):
    model = _tiny(arch)
    a, b = _pair(model, r=4, alpha=8)
    got = fused_blocks(a)
    layers = model.config.num_hidden_layers
    assert sorted(got.values()) == sorted([k for k in expect for _ in range(layers)])
    assert fused_blocks(b) == {}
    a.train(), b.train()
    _assert_same(a, b, token_batches(1, seq=12)[0])


def test_gpt2_stays_per_layer():
    model = fastlora.patch(tiny_gpt2(), r=4, alpha=8)
    assert fused_blocks(model) == {}


def test_grouped_path_runs_one_op_per_group(monkeypatch):
    """The q/k/v LoRA layers of a fused attention are computed by one grouped op per call."""
    from fastlora import grouped

    calls = []
    real = grouped.grouped_linear
    monkeypatch.setattr("fastlora.blocks.grouped_linear", lambda x, ms: calls.append(len(ms)) or real(x, ms))
    mlp_calls = []
    real_mlp = grouped.gated_mlp
    monkeypatch.setattr("fastlora.blocks.gated_mlp", lambda *a: mlp_calls.append(1) or real_mlp(*a))
    model = fastlora.patch(tiny_llama(), r=4, alpha=8)
    calls.clear(), mlp_calls.clear()
    model(**token_batches(1)[0]).loss.backward()
    assert calls == [3, 3] and len(mlp_calls) == 2
    for group in [m._fastlora_qkv[0] for m in model.modules() if "_fastlora_qkv" in m.__dict__]:
        assert group.cache is None and group.disabled is None  # nothing kept after the forward


def test_nf4_model_grouped_equals_per_layer():
    model = quantize_model_bnb(tiny_llama())
    a, b = _pair(model, r=4, alpha=8)
    assert len(fused_blocks(a)) == 4
    a.train(), b.train()
    _assert_same(a, b, token_batches(1)[0])


def test_gradient_checkpointing_and_dropout():
    a, b = _pair(tiny_llama(), r=4, alpha=8, dropout=0.2)
    for m in (a, b):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    batch = token_batches(1)[0]
    torch.manual_seed(5)
    la, ga = _loss_and_grads(a, batch)
    torch.manual_seed(5)
    lb, gb = _loss_and_grads(b, batch)
    assert abs(la.item() - lb.item()) < 1e-5 * lb.item()
    for n in ga:
        assert relerr(ga[n][0], gb[n][0]) < 1e-4 and relerr(ga[n][1], gb[n][1]) < 1e-4, n


def test_odd_hidden_model_trains_grouped():
    """A model of odd widths (hidden 1000, MLP 2730) trains through the grouped path, step for step
    equal to the per-layer model."""
    model = tiny_llama(
        hidden_size=1000, intermediate_size=2730, num_hidden_layers=1, num_attention_heads=10,
        num_key_value_heads=5, vocab_size=64,
    )  # fmt: skip
    a, b = _pair(model, r=8, alpha=16)
    assert set(fused_blocks(a).values()) == {"qkv", "gated_mlp"}
    losses = {}
    for name, m in (("grouped", a), ("per_layer", b)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for batch in token_batches(4, batch=2, seq=8, vocab=64, seed=3):
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["grouped"][-1] < losses["grouped"][0]  # it learns
    for x, y in zip(losses["grouped"], losses["per_layer"]):
        assert abs(x - y) < 1e-4 * abs(y)


def test_fuse_off_unpatch_save_load(tmp_path):
    base = tiny_llama()
    a, b = _pair(base, r=4, alpha=8)
    assert fused_blocks(fastlora.patch(copy.deepcopy(base), fuse_blocks=False)) == {}
    # the saved adapter is the same file content whether grouped or not
    fastlora.save_adapter(a, tmp_path / "a")
    fastlora.save_adapter(b, tmp_path / "b")
    from safetensors.torch import load_file

    sa, sb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # loading gives a grouped model again, computing the same function
    loaded = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert fused_blocks(loaded) == fused_blocks(a)
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert relerr(loaded(input_ids=ids).logits, b(input_ids=ids).logits) < 1e-6
    # unpatch takes every override away: the model is its original class again, bit for bit
    fastlora.unpatch(a)
    assert fused_blocks(a) == {} and not fastlora.lora_layers(a)
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in a.modules())
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, base(input_ids=ids).logits)


def test_cross_attention_style_calls_fall_back():
    """Siblings called with different inputs (cross-attention) get correct outputs, and grouping is
    turned off for that module."""
    model = fastlora.patch(tiny_llama(), r=4, alpha=8)
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 64), torch.randn(3, 64)
    q = attn.q_proj(x1)
    k = attn.k_proj(x2)
    v = attn.v_proj(x2)
    group = attn._fastlora_qkv[0]
    assert group.disabled is not None
    for out, m, x in ((q, attn.q_proj, x1), (k, attn.k_proj, x2), (v, attn.v_proj, x2)):
        assert torch.allclose(out, LoraLinear.forward(m, x), atol=1e-6)


def test_deepcopy_of_fused_model_is_independent():
    a = fastlora.patch(tiny_llama(), r=4, alpha=8)
    c = copy.deepcopy(a)
    assert fused_blocks(c) == fused_blocks(a)
    ga = a.model.layers[0].self_attn._fastlora_qkv[0]
    gc = c.model.layers[0].self_attn._fastlora_qkv[0]
    assert ga is not gc and gc.members[0] is c.model.layers[0].self_attn.q_proj
    assert c.model.layers[0].mlp.forward.module is c.model.layers[0].mlp


@pytest.mark.parametrize("quant", [False, True])
def test_compile_fullgraph_uses_per_layer_ops(quant):
    """No graph break with fused blocks patched in, on a float and on a bnb NF4 base (the 4-bit
    layers' cached weight view must not be traced: Dynamo refuses its weak dictionary)."""
    model = tiny_llama()
    a, b = _pair(quantize_model_bnb(model) if quant else model, r=4, alpha=8)
    a.train(), b.train()
    batch = token_batches(1)[0]
    torch._dynamo.reset()
    compiled = torch.compile(a, fullgraph=True, backend="aot_eager")
    loss = compiled(**batch).loss
    loss.backward()
    ref, _ = _loss_and_grads(b, batch)
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    torch._dynamo.reset()


def test_activation_backward_kernel_strided_dh():
    """dh as the first F columns of a wider buffer (the layout the gated MLP's backward hands over)."""
    pytest.importorskip("triton")
    eu = torch.randn(4, 2 * 24)
    wide = torch.randn(4, 24 + 8)
    h_t, deu_t = act_mul_backward(wide.clone()[:, :24], eu, "silu", use_triton=True)
    h_r, deu_r = act_mul_backward(wide[:, :24].clone(), eu, "silu", use_triton=False)
    assert relerr(deu_t, deu_r) < 1e-5 and relerr(h_t, h_r) < 1e-6


def test_gpu_code_path_in_interpreter(monkeypatch):
    """The CUDA path of the grouped ops -- 4-bit weights dequantised by the Triton kernel into the
    scratch, the activation kernels -- run here in Triton's interpreter, against per-layer layers."""
    pytest.importorskip("triton")
    from fastlora import grouped

    monkeypatch.setattr(grouped, "_use_kernel", lambda device: True)
    monkeypatch.setattr(grouped, "_use_triton", lambda t: True)
    gate_up, down = _mlp_layers(64, 128, torch.float32, quant=True, frozen=True)
    layers = [*gate_up, down]
    x = torch.randn(6, 64, requires_grad=True)
    ref_out = _mlp_per_layer(x, gate_up, down, "silu")
    ref = _grads(layers, x, [ref_out])
    out = gated_mlp(x, gate_up, down, "silu")
    got = _grads(layers, x, [out])
    assert relerr(out, ref_out) < 1e-6
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-5


def test_single_token_runs_per_layer(monkeypatch):
    """Decoding (one row): each layer runs its own op (its small-M 4-bit kernel on CUDA)."""
    calls = []
    a, b = _pair(tiny_llama(), r=4, alpha=8)
    monkeypatch.setattr("fastlora.blocks.grouped_linear", lambda x, ms: calls.append(1))
    monkeypatch.setattr("fastlora.blocks.gated_mlp", lambda *a: calls.append(1))
    ids = torch.tensor([[5]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gpu_grouped_ops_nf4_bf16(kind, fold, device="cuda"):
    """On CUDA (Triton dequantisation into the scratch, cuBLAS, the activation kernels): q/k/v and
    the gated MLP in bf16 on NF4 bases, against float64 and against the per-layer CUDA ops."""
    qkv = [m.to(device) for m in _layers(256, (512, 128, 128), (16, 16, 8), torch.bfloat16, quant=True, frozen=True)]
    gate_up, down = _mlp_layers(256, 704, torch.bfloat16, quant=True)
    mlp = [m.to(device) for m in (*gate_up, down)]
    x = torch.randn(2, 150, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    cases = [
        (qkv, lambda: grouped_linear(x, qkv), lambda ls, xx: [m(xx) for m in ls]),
        (mlp, lambda: [gated_mlp(x, mlp[:2], mlp[2], kind)], lambda ls, xx: [_mlp_per_layer(xx, ls[:2], ls[2], kind)]),
    ]
    for layers, grouped_fn, per_layer_fn in cases:
        out, ref_out = grouped_fn(), per_layer_fn(layers, x)
        got, ref = _grads(layers, x, out), _grads(layers, x, ref_out)
        # float64 truth: the same layers on dense float64 copies of their dequantised weights
        twin = copy.deepcopy(layers)
        for m in twin:
            w = m.dense_base_weight(torch.float64)
            m.base_layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64, device=device)
            m.base_layer.weight.data.copy_(w)
            m.base_layer.requires_grad_(False)
            m.to(torch.float64)
        x64 = x.detach().double().requires_grad_(True)
        truth_out = per_layer_fn(twin, x64)
        truth = _grads(twin, x64, truth_out)
        for o, r, t in zip(out, ref_out, truth_out):
            assert o.dtype == torch.bfloat16 and relerr(o, t) < 1e-2 and relerr(r, t) < 1e-2
        for g, r, t in zip(got, ref, truth):
            assert relerr(g, t) < 1e-2, (relerr(g, t), relerr(r, t))
    # dA, dB of the fp32 parameters came straight out of their GEMMs in fp32 (addmm's out_dtype), with
    # no fallback to a cast on this torch.
    from fastlora.ops import reference

    assert reference._OUT_DTYPE_MM


BENCH_BLOCK = Path(__file__).resolve().parents[1] / "bench" / "bench_block.py"


@pytest.mark.skipif(not BENCH_BLOCK.is_file(), reason="bench/ is not part of this checkout")
def test_bench_block_smoke(tmp_path):
    """``bench/bench_block.py --tiny``: every CPU arm builds, runs one decoder layer forward+backward and
    is reported (the no-fold arm really runs with the flag off and leaves it on after)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    out = tmp_path / "block.json"
    arms = ["nolora-nf4", "peft-bnb-nf4", "fastlora-nf4", "fastlora-nf4-nofold"]
    proc = subprocess.run(
        [sys.executable, str(BENCH_BLOCK), "--tiny", "--models", "1b", "--rounds", "1", "--reps", "1",
         "--arms", *arms, "--json", str(out)],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == arms
    assert all(r["host_us"] > 0 for r in rows)


def test_fold_flag_changes_only_the_forward_path(monkeypatch):
    """The two grouped forwards give the same outputs and gradients (fp32, tight), and the flag is
    what picks the path: the folded one reads a [W0 | B] scratch, the other does not."""
    layers = _layers(40, (48, 16, 16), (4, 2, 8), torch.float32)
    x = torch.randn(5, 40, requires_grad=True)
    results, widths = {}, {}
    real = grouped.scratch_weight
    for fold in (True, False):
        monkeypatch.setattr(grouped, "FOLD_FORWARD", fold)
        seen = []
        monkeypatch.setattr(
            grouped, "scratch_weight", lambda *a, _seen=seen, **k: _seen.append(k["with_b"]) or real(*a, **k)
        )
        out = grouped_linear(x, layers)
        results[fold] = (out, _grads(layers, x, out))
        widths[fold] = seen
    assert widths[True][0] is True and widths[False][0] is False  # forward's scratch, then backward's
    for a, b in zip(results[True][0] + list(results[True][1]), results[False][0] + list(results[False][1])):
        assert relerr(a, b) < 1e-5


def test_b_changed_in_place_before_backward_is_an_error():
    """The grouped ops keep the B parameters themselves for backward (no copies): autograd's version
    counter must catch one changed in place between forward and backward, not use the new values."""
    layers = _layers(40, (48, 16, 16), (4, 2, 8), torch.float32)
    x = torch.randn(5, 40, requires_grad=True)
    out = grouped_linear(x, layers)
    with torch.no_grad():
        layers[1].lora_B.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(layers, x, out)
    gate_up, down = _mlp_layers(40, 64, torch.float32)
    out = gated_mlp(x, gate_up, down, "silu")
    with torch.no_grad():
        down.lora_B.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
