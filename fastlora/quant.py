"""bitsandbytes 4-bit storage, read and written in pure PyTorch.

This module is the reference for every 4-bit path in fastlora: the Triton kernels are tested
against :func:`dequantize`, and :func:`dequantize` is tested bit for bit against
``bitsandbytes.functional.dequantize_4bit``.

Storage (bitsandbytes 0.4x/0.5x, ``Params4bit`` + ``QuantState``):

* ``W[N, K]`` is flattened row-major and packed two 4-bit codes per byte; the *first* element of
  each pair sits in the *high* nibble. bnb keeps the bytes as ``uint8[(N*K+1)//2, 1]`` (or the same
  bytes viewed as another ``quant_storage`` dtype).
* ``absmax``: one fp32 scale per ``blocksize`` consecutive flat elements.
* double quantisation ("nested"): ``absmax`` itself is stored as uint8 codes into a 256-entry signed
  dynamic map (``code2``), blockwise with ``blocksize2`` (256) and fp32 ``absmax2``; the real scale is
  ``code2[q] * absmax2[j // blocksize2]`` and then ``+ offset`` -- two separate fp32 roundings.
* value = ``code[q] * absmax[block]`` computed in fp32 and rounded once to the output dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import cache

import torch

from ._dist import is_dtensor

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "QuantizedWeight",
    "dequantize",
    "dequantize_absmax",
    "from_bnb",
    "is_bnb_4bit",
    "packed_bytes",
    "quantize_4bit",
    "set_quant_storage",
]

# Quantiles of N(0, 1) with an exact zero, normalised to [-1, 1] (QLoRA, arXiv 2305.14314).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bnb's FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by its
# largest magnitude (12) in fp32 exactly as ``bitsandbytes.functional.get_4bit_type`` does.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE: tuple[float, ...] = tuple((torch.tensor(_FP4_RAW) / 12.0).tolist())

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


@cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type not in _CODES:
        raise ValueError(f"fastlora: unknown 4-bit quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    return torch.tensor(_CODES[quant_type], dtype=torch.float32)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 lookup table of ``quant_type`` ("nf4" or "fp4") on ``device``."""
    return _code_cpu(quant_type).to(device)


@cache
def _dynamic_map() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), used for nested absmax.

    Built with the same fp32 operations as bnb so that the table is identical bit for bit.
    """
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass(frozen=True)
class QuantizedWeight:
    """A frozen 4-bit weight in bitsandbytes' storage layout (no copy of bnb's tensors is made).

    Attributes:
        packed: uint8, ``ceil(N*K/2)`` bytes, high nibble first.
        absmax: fp32 ``[n_blocks]``, or uint8 codes into ``code2`` when ``nested``.
        code: fp32 ``[16]`` lookup table.
        blocksize: elements per ``absmax`` entry.
        shape: ``(N, K)`` = (out_features, in_features).
        dtype: the dtype bnb dequantises to by default (the layer's original dtype).
        quant_type: "nf4" or "fp4".
        absmax2, code2, blocksize2, offset: double-quantisation state (``None`` when not nested);
            ``offset`` is a 0-d fp32 tensor.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    quant_type: str
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: torch.Tensor | None = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy with every tensor moved to ``device``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            absmax2=mv(self.absmax2),
            code2=mv(self.code2),
            offset=mv(self.offset),
        )


def dequantize_absmax(w: QuantizedWeight) -> torch.Tensor:
    """The fp32 per-block scales of ``w`` (undoing double quantisation if present)."""
    if not w.nested:
        return w.absmax.float()
    assert w.code2 is not None and w.absmax2 is not None and w.offset is not None
    q = w.absmax.reshape(-1).long()
    n = q.numel()
    scale = w.absmax2.float().repeat_interleave(w.blocksize2)[:n]
    # Two fp32 roundings, in bnb's order: code2[q] * absmax2, then + offset.
    return w.code2.float()[q] * scale + w.offset.float()


def dequantize(w: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantise ``w`` to a dense ``[N, K]`` tensor; bit-identical to bnb's ``dequantize_4bit``.

    Args:
        w: the 4-bit weight.
        dtype: output dtype (default ``w.dtype``). Values are formed in fp32 and rounded once.
    """
    n_el = w.shape[0] * w.shape[1]
    packed = packed_bytes(w.packed)
    codes = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).reshape(-1)[:n_el].long()
    absmax = dequantize_absmax(w)
    scale = absmax.repeat_interleave(w.blocksize)[:n_el]
    out = w.code.float()[codes] * scale
    return out.reshape(w.shape).to(dtype or w.dtype)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    n_blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat.abs(), (0, n_blocks * blocksize - n))
    return padded.reshape(n_blocks, blocksize).amax(dim=1)


def _quantize_to_table(
    flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: torch.Tensor, pad_to_even: bool = False
) -> torch.Tensor:
    """Index of the nearest table entry of ``flat / absmax[block]`` (bnb's midpoint bucketing).

    With ``pad_to_even`` an odd count gets one extra code for the value 0.0, as bnb pads.
    """
    scale = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[: flat.numel()]
    scaled = torch.clamp(flat * (1.0 / scale), -1, 1)
    if pad_to_even and scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = torch.argsort(table)
    sorted_table = table[order]
    bounds = (sorted_table[:-1] + sorted_table[1:]) / 2
    return order[torch.bucketize(scaled, bounds)]


def quantize_4bit(
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
) -> QuantizedWeight:
    """Quantise a dense ``[N, K]`` weight to bitsandbytes-compatible 4-bit storage, without bnb.

    The result can be read by :func:`dequantize`, by the fastlora kernels, and -- since the bytes
    follow bnb's layout -- by ``bitsandbytes.functional.dequantize_4bit`` given the same state.

    Args:
        weight: 2-D float tensor ``[out_features, in_features]``.
        blocksize: elements per scale; bnb accepts 32..4096 (powers of two).
        quant_type: "nf4" or "fp4".
        compress_statistics: double-quantise the scales (bnb's default for ``Params4bit``).
    """
    if weight.dim() != 2:
        raise ValueError(f"fastlora.quantize_4bit: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"fastlora.quantize_4bit: blocksize must be a power of two in [32, 4096], got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    table = code_table(quant_type, flat.device)
    absmax = _blockwise_absmax(flat, blocksize)
    codes = _quantize_to_table(flat, absmax, blocksize, table, pad_to_even=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    common = dict(
        packed=packed,
        code=table,
        blocksize=blocksize,
        shape=(weight.shape[0], weight.shape[1]),
        dtype=weight.dtype,
        quant_type=quant_type,
    )
    if not compress_statistics:
        return QuantizedWeight(absmax=absmax, **common)
    offset = absmax.mean()
    centred = absmax - offset
    code2 = _dynamic_map().to(flat.device)
    absmax2 = _blockwise_absmax(centred, 256)
    q2 = _quantize_to_table(centred, absmax2, 256, code2).to(torch.uint8)
    return QuantizedWeight(absmax=q2, absmax2=absmax2, code2=code2, blocksize2=256, offset=offset, **common)


def is_bnb_4bit(module: torch.nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (checked without importing bitsandbytes)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def from_bnb(module: torch.nn.Module) -> QuantizedWeight:
    """View a quantised ``bitsandbytes.nn.Linear4bit``'s weight as a :class:`QuantizedWeight`.

    Raises:
        ValueError: the layer has not been quantised yet (bnb quantises on ``.cuda()``/``.to()``).
    """
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        # FSDP2 (like FSDP1) hands the forward a plain gathered tensor instead of the Params4bit; the
        # state stays on the module (bitsandbytes' fix_4bit_weight_quant_state_from_module does the same).
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise ValueError(
            "fastlora: this bitsandbytes Linear4bit holds no quant_state (it is quantised when moved to a "
            "device, e.g. model.to('cuda') or model.to('cpu')); move the model to its device before patching"
        )
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes >= 0.49 repacks a Linear4bit into a CPU-only layout (bf16 scales, interleaved
        # nibbles) the first time it runs in eval mode without grad on an AVX512-bf16 CPU. Its public
        # state_dict() converts the layer back to the standard layout in place; the bf16 rounding of
        # the scales cannot be undone, so the values now differ slightly from the original ones.
        warnings.warn(
            "fastlora: a bitsandbytes Linear4bit had been repacked into bitsandbytes' CPU inference layout by "
            "an earlier eval-mode forward; converting it back (its scales were rounded to bf16 by bitsandbytes). "
            "Patch the model before running it on the CPU to keep the original quantisation exactly.",
            stacklevel=2,
        )
        module.state_dict()
        weight = module.weight
        qs = weight.quant_state
    shape = (int(qs.shape[0]), int(qs.shape[1]))
    packed = packed_bytes(weight.data)
    if packed.numel() != (shape[0] * shape[1] + 1) // 2:
        raise RuntimeError(
            f"fastlora: the packed 4-bit weight of a {shape[0]}x{shape[1]} bitsandbytes Linear4bit holds "
            f"{packed.numel()} bytes, not {(shape[0] * shape[1] + 1) // 2}: its storage ({weight.dtype}) was cast "
            "as a number, e.g. by FSDP2's MixedPrecisionPolicy(param_dtype=...) or model.to(dtype). Store the "
            "4-bit bytes in the dtype the wrapper computes in (fastlora.quant.set_quant_storage(model, dtype), "
            "bnb quant_storage=..., or let fastlora.fully_shard choose it)"
        )
    nested = dict()
    if qs.nested:
        nested = dict(
            absmax2=qs.state2.absmax,
            code2=qs.state2.code,
            blocksize2=int(qs.state2.blocksize),
            offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device),
        )
    return QuantizedWeight(
        packed=packed,
        absmax=qs.absmax,
        code=qs.code,
        blocksize=int(qs.blocksize),
        shape=shape,
        dtype=qs.dtype,
        quant_type=qs.quant_type,
        **nested,
    )


def packed_bytes(data: torch.Tensor) -> torch.Tensor:
    """The bytes of a packed 4-bit weight as a flat uint8 tensor (a view, whatever the storage dtype)."""
    flat = data if data.dim() == 1 else data.reshape(-1)  # (checked first: a reshape is host time per call)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def set_quant_storage(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the packed bytes of every bitsandbytes ``Linear4bit`` in ``model`` as ``dtype``; no copy.

    bitsandbytes' ``quant_storage`` (transformers' ``bnb_4bit_quant_storage``) after the fact: the
    same bytes, reinterpreted as ``[ceil(N*K/2) / itemsize, 1]`` elements of ``dtype``, which is what
    bitsandbytes writes when it quantises with that storage. FSDP2 (like FSDP1) shards only floating-
    point parameters safely: torch before 2.13 cannot wrap a uint8 one at all (``only Tensors of
    floating point dtype can require gradients``), and a ``MixedPrecisionPolicy(param_dtype=...)``
    casts any storage of another dtype, which destroys the bytes. Use the dtype the wrapper computes
    in (``param_dtype``, else the model's). fastlora and bitsandbytes read every storage dtype.

    Args:
        model: a model (or a single ``Linear4bit``), quantised (moved to its device), not yet sharded.
        dtype: ``torch.uint8`` or a floating-point dtype.

    Returns:
        How many layers were changed (layers already stored as ``dtype`` are left as they are).

    Raises:
        ValueError: ``dtype`` is neither uint8 nor floating point, or a layer's byte count is not a
            multiple of its size (the weight has fewer than that many bytes of padding).
        RuntimeError: a weight is already sharded by FSDP (call this before ``fully_shard``).
    """
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"fastlora.set_quant_storage: dtype must be torch.uint8 or a float dtype, got {dtype}")
    changed = 0
    for name, module in model.named_modules():
        if not is_bnb_4bit(module):
            continue
        label = name or type(module).__name__
        if is_dtensor(module.weight):
            raise RuntimeError(
                f"fastlora.set_quant_storage: layer {label} is already sharded; set the storage before fully_shard"
            )
        qw = from_bnb(module)  # checks that it is quantised; undoes bitsandbytes' CPU repacking
        if module.weight.dtype == dtype:
            continue
        if qw.packed.numel() % dtype.itemsize:
            raise ValueError(
                f"fastlora.set_quant_storage: layer {label} packs {qw.packed.numel()} bytes, not a multiple of "
                f"{dtype}'s {dtype.itemsize}; store it as uint8 (and keep it out of FSDP sharding)"
            )
        module.weight.data = qw.packed.view(dtype).reshape(-1, 1)
        if hasattr(module.weight, "quant_storage"):
            module.weight.quant_storage = dtype
        # bitsandbytes rebuilds a Params4bit from the module's quant_storage when FSDP hands it a plain tensor.
        module.quant_storage = dtype
        changed += 1
    return changed
