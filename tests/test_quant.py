"""The pure-PyTorch 4-bit reference against bitsandbytes, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastlora.quant import (
    FP4_CODE,
    NF4_CODE,
    QuantizedWeight,
    dequantize,
    dequantize_absmax,
    from_bnb,
    quantize_4bit,
    set_quant_storage,
)

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 128), (72, 40), (33, 71), (200, 96), (128, 4104)]


def _from_state(packed: torch.Tensor, qs) -> QuantizedWeight:
    nested = {}
    if qs.nested:
        nested = dict(absmax2=qs.state2.absmax, code2=qs.state2.code, blocksize2=qs.state2.blocksize,
                      offset=torch.as_tensor(qs.offset))  # fmt: skip
    return QuantizedWeight(packed=packed.reshape(-1), absmax=qs.absmax, code=qs.code, blocksize=qs.blocksize,
                           shape=tuple(qs.shape), dtype=qs.dtype, quant_type=qs.quant_type, **nested)  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _bnb_generic_dequantize(packed, qs, dtype):
    """bnb's device-independent implementation (its CUDA kernel computes the same fp32 products).

    Used as the oracle for shapes where bnb 0.50.2's CPU (AVX) kernel is wrong; see
    test_bnb_cpu_kernel_is_wrong_for_ragged_rows.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape, dtype)


def test_code_tables_match_bnb():
    assert torch.equal(torch.tensor(NF4_CODE), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(FP4_CODE), F.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_bit_exact(shape, blocksize, nested, quant_type, dtype):
    w = torch.randn(shape, dtype=dtype) * 0.05
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    ours = dequantize(_from_state(packed, qs))
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(_bits(ours), _bits(_bnb_generic_dequantize(packed, qs, dtype)))
    if shape[1] % blocksize == 0:  # bnb's public CPU kernel is right on these shapes
        assert torch.equal(_bits(ours), _bits(F.dequantize_4bit(packed, qs)))


def test_bnb_cpu_kernel_is_wrong_for_ragged_rows():
    """Documents why the oracle above is bnb's generic path: its AVX CPU kernel assumes row-aligned blocks."""
    w = torch.randn(200, 96)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = dequantize(_from_state(packed, qs))
    assert (ours - w).norm() / w.norm() < 0.12  # 4-bit quantisation error
    assert (F.dequantize_4bit(packed, qs) - w).norm() / w.norm() > 0.2


@pytest.mark.parametrize("shape", [(72, 40), (33, 71), (128, 256)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_quantizer_matches_bnb_storage(shape, quant_type, nested):
    w = torch.randn(shape)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    assert torch.equal(ours.packed, packed.reshape(-1))
    if not nested:
        assert torch.equal(ours.absmax, qs.absmax)
        assert torch.equal(dequantize(ours), _bnb_generic_dequantize(packed, qs, torch.float32))
        return
    assert torch.equal(ours.absmax2, qs.state2.absmax) and torch.equal(ours.code2, qs.state2.code)
    assert torch.equal(ours.offset, torch.as_tensor(qs.offset))
    # The 8-bit codes of the scales may differ near ties: bnb's CPU kernel sometimes takes the
    # farther of two codes, ours always the nearer (near zero the dynamic map's codes are dense,
    # so the two can be several codes apart at almost the same value). Rare, and never worse.
    differ = ours.absmax != qs.absmax
    assert differ.sum() <= max(2, 0.02 * differ.numel())
    true_absmax = w.reshape(-1)[: (w.numel() // 64) * 64].reshape(-1, 64).abs().amax(1)
    n = true_absmax.numel()
    err_ours = (dequantize_absmax(ours)[:n] - true_absmax).abs()
    err_bnb = ((F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)[:n] - true_absmax).abs()
    assert (err_ours <= err_bnb + 1e-9).all()
    # Given bnb's own codes, the bytes decode identically.
    same = QuantizedWeight(**{**ours.__dict__, "absmax": qs.absmax})
    assert torch.equal(dequantize(same), _bnb_generic_dequantize(packed, qs, torch.float32))


def test_quantizer_rejects_bad_blocksize():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(8, 8), blocksize=48)


@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_from_bnb_linear4bit(blocksize):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 256), requires_grad=False, quant_type="nf4", blocksize=blocksize)
    layer = layer.to("cpu")
    qw = from_bnb(layer)
    assert qw.shape == (64, 256) and qw.nested and qw.blocksize == blocksize
    assert torch.equal(dequantize(qw, torch.float32), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    x = torch.randn(3, 256)
    torch.testing.assert_close(x @ dequantize(qw, torch.float32).t() + layer.bias, layer(x))


def test_from_bnb_after_bnb_cpu_repack():
    """bnb repacks a Linear4bit for its CPU kernel on an eval/no-grad forward; from_bnb undoes that."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 256), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    w_before = dequantize(from_bnb(layer), torch.float32)
    with torch.no_grad():
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        # This CPU has no AVX512-bf16: bnb kept the standard layout, and so must we.
        assert torch.equal(dequantize(from_bnb(layer), torch.float32), w_before)
        return
    with pytest.warns(UserWarning, match="repacked"):
        qw = from_bnb(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    w_after = dequantize(qw, torch.float32)
    assert torch.equal(w_after, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float())
    assert (w_after - w_before).norm() / w_before.norm() < 1e-2  # only bnb's bf16 rounding of the scales


# -- quant_storage: the packed bytes stored as another dtype (how FSDP shards a 4-bit base) ----------

STORAGES = [torch.uint8, torch.bfloat16, torch.float16, torch.float32]


def _linear4bit(weight: torch.Tensor, storage: torch.dtype, blocksize: int = 64):
    import bitsandbytes as bnb

    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, quant_type="nf4", blocksize=blocksize, quant_storage=storage
    )
    return layer.to("cpu")


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_bit_exact_for_every_quant_storage(storage, nested, dtype):
    w = torch.randn(96, 256, dtype=dtype) * 0.05
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage
    ours = dequantize(_from_state(packed, qs))
    assert torch.equal(_bits(ours), _bits(F.dequantize_4bit(packed, qs)))
    # The same bytes as the uint8 storage: the dtype is only a view.
    packed8, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert torch.equal(packed.reshape(-1).view(torch.uint8), packed8.reshape(-1))


@pytest.mark.parametrize("storage", STORAGES)
def test_from_bnb_reads_any_quant_storage_as_bytes(storage):
    w = torch.randn(64, 256)
    layer, ref = _linear4bit(w, storage), _linear4bit(w, torch.uint8)
    assert layer.weight.dtype == storage
    qw = from_bnb(layer)
    assert qw.packed.dtype == torch.uint8 and qw.packed.dim() == 1
    assert torch.equal(qw.packed, from_bnb(ref).packed)
    assert torch.equal(dequantize(qw), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_set_quant_storage_reviews_the_bytes_in_place(storage):
    w = torch.randn(64, 256)
    layer, native = _linear4bit(w, torch.uint8), _linear4bit(w, storage)
    before = from_bnb(layer).packed.clone()
    model = torch.nn.Sequential(layer)
    assert set_quant_storage(model, storage) == 1
    assert set_quant_storage(model, storage) == 0  # already so
    # Exactly what bitsandbytes writes when it quantises with that storage.
    assert layer.weight.dtype == storage and layer.weight.shape == native.weight.shape
    assert torch.equal(layer.weight.data.view(torch.uint8), native.weight.data.view(torch.uint8))
    assert layer.quant_storage == storage and layer.weight.quant_storage == storage
    assert torch.equal(from_bnb(layer).packed, before)
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), native(x))  # bitsandbytes' own forward reads it too
    assert set_quant_storage(model, torch.uint8) == 1 and layer.weight.dtype == torch.uint8
    assert torch.equal(from_bnb(layer).packed, before)


def test_set_quant_storage_rejects_bad_dtypes_and_byte_counts():
    with pytest.raises(ValueError, match="float dtype"):
        set_quant_storage(torch.nn.Sequential(), torch.int32)
    layer = _linear4bit(torch.randn(3, 12), torch.uint8)  # 18 bytes: not a whole number of fp32 words
    with pytest.raises(ValueError, match="not a multiple"):
        set_quant_storage(torch.nn.Sequential(layer), torch.float32)


def test_from_bnb_refuses_a_cast_storage():
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16) on fp32-stored bytes casts them as numbers."""
    layer = _linear4bit(torch.randn(64, 256), torch.float32)
    layer.quant_state = layer.weight.quant_state  # kept on the module, as LoraLinear does for FSDP
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.bfloat16), requires_grad=False)
    with pytest.raises(RuntimeError, match=r"was cast.*MixedPrecisionPolicy"):
        from_bnb(layer)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_lora_layer_on_float_storage_equals_uint8_storage(backend, storage):
    """The reference op and the Triton kernels (interpreted on the CPU) read the bytes, not the dtype."""
    from fastlora import LoraLinear, set_backend

    w = torch.randn(64, 128)
    outs = []
    for st in (torch.uint8, storage):
        torch.manual_seed(0)
        layer = LoraLinear(_linear4bit(w, st), r=4, lora_alpha=8)
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        x = torch.randn(5, 128, requires_grad=True)
        set_backend(backend)
        try:
            y = layer(x)
            y.square().sum().backward()
        finally:
            set_backend("auto")
        outs.append((y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_lora_layer_caches_its_4bit_view_with_the_weight():
    """LoraLinear builds the op's view of a bnb weight once per weight: the same object while the
    Params4bit, its storage dtype and its state stay; a new one when any changes; dropped with the
    weight (no old storage kept alive by the cache)."""
    import gc
    import weakref

    from helpers import quantize_model_bnb

    from fastlora import LoraLinear
    from fastlora.layer import _QUANT_VIEWS

    torch.manual_seed(0)
    base = quantize_model_bnb(torch.nn.Sequential(torch.nn.Linear(64, 32)))[0]
    layer = LoraLinear(base, r=4, lora_alpha=8)
    first = layer.base_weight()
    assert layer.base_weight() is first
    x = torch.randn(3, 64)
    y = layer(x)
    assert layer.base_weight() is first

    set_quant_storage(layer, torch.bfloat16)  # a new dtype view of the same bytes
    second = layer.base_weight()
    assert second is not first and torch.equal(second.packed, first.packed)
    assert torch.equal(layer(x), y)

    old = layer.base_layer.weight
    other = quantize_model_bnb(torch.nn.Sequential(torch.nn.Linear(64, 32)))[0]
    layer.base_layer.weight, layer.base_layer.quant_state = other.weight, other.weight.quant_state
    third = layer.base_weight()
    assert third is not second and not torch.equal(layer(x), y)
    assert old in _QUANT_VIEWS and layer.base_layer.weight in _QUANT_VIEWS
    old_ref = weakref.ref(old)
    del old, first, second
    gc.collect()
    assert old_ref() is None  # the cache did not keep the replaced weight alive
    assert layer.base_weight() is third
