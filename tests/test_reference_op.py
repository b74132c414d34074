"""The reference LoRA op's forward and backward against float64 autograd."""

from __future__ import annotations

import pytest
import torch
from helpers import relerr

from fastlora.ops.reference import dropout_mask, lora_linear_reference
from fastlora.quant import dequantize, quantize_4bit

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _inputs(batch, K, N, r, dtype, noncontig=False):
    x = torch.randn(*batch, K * 2 if noncontig else K, dtype=dtype)
    if noncontig:
        x = x[..., ::2]  # stride 2 in the last dim
        assert not x.is_contiguous()
    w = torch.randn(N, K, dtype=dtype) / K**0.5
    A = torch.randn(r, K, dtype=dtype) / K**0.5
    B = torch.randn(N, r, dtype=dtype) / r**0.5
    bias = torch.randn(N, dtype=dtype)
    return x, w, A, B, bias


def _ref64(x, w, A, B, bias, s, mask=None):
    x64 = x.detach().double().requires_grad_()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    xd = x64 if mask is None else x64 * mask.double()
    y = x64 @ w.double().t() + s * (xd @ A64.t()) @ B64.t() + bias.double()
    return y, x64, A64, B64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(1,), (2, 3), (5,)])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("noncontig", [False, True])
def test_forward_backward_vs_float64(dtype, batch, r, noncontig):
    K, N, s = 72, 40, 1.7
    x, w, A, B, bias = _inputs(batch, K, N, r, dtype, noncontig)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = lora_linear_reference(x, w, A, B, s, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, x64, A64, B64 = _ref64(x, w, A, B, bias, s)
    y64.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*batch, N)
    assert relerr(y, y64) < tol
    assert relerr(x.grad, x64.grad) < tol
    assert relerr(A.grad, A64.grad) < tol
    assert relerr(B.grad, B64.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_vs_float64(dtype):
    K, N, r, s = 128, 72, 8, 2.0
    x, w, A, B, bias = _inputs((3, 5), K, N, r, dtype)
    qw = quantize_4bit(w.float(), blocksize=64)
    w_dq = dequantize(qw, dtype)
    for t in (x, A, B):
        t.requires_grad_()
    y = lora_linear_reference(x, qw, A, B, s, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, x64, A64, B64 = _ref64(x, w_dq, A, B, bias, s)
    y64.backward(dy.double())
    for got, ref in [(y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)]:
        assert relerr(got, ref) < TOL[dtype]


def test_dropout_fixed_seed_and_regenerated_mask():
    K, N, r, s, p = 40, 24, 4, 1.0, 0.3
    x, w, A, B, bias = _inputs((6,), K, N, r, torch.float32)
    for t in (x, A, B):
        t.requires_grad_()
    y = lora_linear_reference(x, w, A, B, s, bias, dropout_p=p, seed=1234)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = dropout_mask(x.shape, p, 1234, x.device)
    keep = (mask > 0).float().mean().item()
    assert 0.5 < keep < 0.9  # about 1 - p
    y64, x64, A64, B64 = _ref64(x, w, A, B, bias, s, mask)
    y64.backward(dy.double())
    for got, ref in [(y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)]:
        assert relerr(got, ref) < 1e-4
    y2 = lora_linear_reference(x, w, A, B, s, bias, dropout_p=p, seed=1234)
    y3 = lora_linear_reference(x, w, A, B, s, bias, dropout_p=p, seed=99)
    assert torch.equal(y, y2) and not torch.equal(y, y3)


def test_saves_only_x_and_xa():
    """The op keeps x, x·Aᵀ and the (small) LoRA factors for backward — never a dense W0."""
    K, N, r = 256, 512, 4
    x = torch.randn(3, K, requires_grad=True)
    qw = quantize_4bit(torch.randn(N, K))
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear_reference(x, qw, A, B, 1.0)
    assert sorted(saved) == sorted([(3, K), (3, r), (r, K), (N, r)])


def test_no_grad_for_frozen_bias_and_base():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16)
    A = torch.randn(2, 16, requires_grad=True)
    B = torch.zeros(8, 2, requires_grad=True)
    bias = torch.randn(8)
    lora_linear_reference(x, w, A, B, 1.0, bias).sum().backward()
    assert w.grad is None and bias.grad is None
    assert B.grad is not None and torch.count_nonzero(B.grad) > 0


def test_dropout_mask_statistics_and_tensor_seed():
    """The counter-based mask keeps ~1-p, differs between seeds, and an int seed and a 1-element
    integer tensor with the same low 31 bits give the same mask."""
    p = 0.3
    m = dropout_mask((64, 256), p, 1234, torch.device("cpu"))
    assert abs((m > 0).float().mean().item() - (1 - p)) < 0.02  # 16384 draws: sd ≈ 0.0036
    assert torch.equal(m[m > 0], torch.full_like(m[m > 0], 1 / (1 - p)))
    assert not torch.equal(m, dropout_mask((64, 256), p, 1235, torch.device("cpu")))
    assert torch.equal(m, dropout_mask((64, 256), p, torch.tensor([1234], dtype=torch.int32), torch.device("cpu")))
    assert torch.equal(m, dropout_mask((64, 256), p, torch.tensor(2**40 + 1234), torch.device("cpu")))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_patched_model_with_dropout_compiles_fullgraph_on_the_reference_path(backend):
    """Issue 16 item 5: ``torch.compile(fullgraph=True)`` of a patched model with LoRA dropout > 0 on
    the CPU (the reference op) raised "An opaque object was created in the middle of the program"
    (a ``torch.Generator`` built inside the traced region) and, without fullgraph, broke the graph
    there. The mask is now made of tensor ops from a seed tensor. Compiled and eager agree for the
    same torch.manual_seed (``fallback_random``: Inductor then draws the seed as eager does)."""
    import torch._inductor.config as inductor_config
    from helpers import tiny_llama

    import fastlora

    model = fastlora.patch(tiny_llama(), r=4, alpha=8, dropout=0.2).train()
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    ids = torch.randint(0, 96, (2, 10))
    torch._dynamo.reset()
    outs = []
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            for fn in (model, compiled):
                model.zero_grad()
                torch.manual_seed(3)
                loss = fn(input_ids=ids, labels=ids).loss
                loss.backward()
                grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
                outs.append((loss.detach(), grads))
    finally:
        torch._dynamo.reset()
    assert relerr(outs[0][0], outs[1][0]) < 1e-5
    for a, b in zip(outs[0][1], outs[1][1]):
        assert relerr(a, b) < 1e-4
