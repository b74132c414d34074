"""``LoraLinear``: a frozen base linear layer plus a trainable low-rank update, one autograd op."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._dist import full_tensor, is_dtensor
from .ops import lora_linear
from .ops.reference import BaseWeight, base_weight_dense
from .quant import QuantizedWeight, from_bnb, is_bnb_4bit


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear layer, weight stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def base_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def _check_rank(r: object, layer: str, in_features: int, out_features: int) -> int:
    """``r`` as a Python int, or a ValueError naming the layer (numpy ints accepted; bools are not ranks)."""
    limit = min(in_features, out_features)
    valid = not isinstance(r, bool) and hasattr(r, "__index__")
    if valid:
        r = operator.index(r)
    if not valid or not 1 <= r <= limit:
        raise ValueError(
            f"fastlora: r={r!r} does not fit layer {layer} ({in_features}->{out_features}); "
            f"r must be a whole number with 1 <= r <= {limit}"
        )
    return r


def _check_alpha(alpha: object, layer: str) -> float:
    """``alpha`` as a float, or a ValueError naming the layer: a positive, finite number."""
    value = float(alpha) if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"fastlora: alpha={alpha!r} for layer {layer} must be a positive finite number (the update is scaled "
            "by alpha/r; alpha=r gives scaling 1)"
        )
    return value


# A 4-bit base weight -> (key, its QuantizedWeight view, its quant state); see LoraLinear._quant_view.
_QUANT_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class LoraLinear(nn.Module):
    """A linear layer ``y = base(x) + scaling · dropout(x)·lora_Aᵀ·lora_Bᵀ`` with ``base`` frozen.

    Attributes:
        base_layer: the original ``nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or transformers
            ``Conv1D``, unchanged and frozen.
        lora_A: ``nn.Parameter [r, in_features]``.
        lora_B: ``nn.Parameter [out_features, r]``.
        scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        lora_A0, lora_B0: optional frozen buffers of a second low-rank term that is *subtracted*:
            the layer computes ``W0 + scaling·(B·A − B0·A0)``. LoRA-GA uses it to offset a 4-bit
            ``W0`` exactly instead of re-quantising it.
        name: the module's path in the model, used in error messages and adapter keys.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        in_features, out_features = base_features(base_layer)
        r = _check_rank(r, name or type(base_layer).__name__, in_features, out_features)
        lora_alpha = _check_alpha(lora_alpha, name or type(base_layer).__name__)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fastlora: dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora, self.dropout = r, float(lora_alpha), use_rslora, float(dropout)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = next(base_layer.parameters()).device
        param_dtype = dtype or self._default_param_dtype()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=param_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=param_dtype))
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        # True when the frozen term was already subtracted from a float W0 in place (LoRA-GA on a
        # float model): forward then skips it, but exports and merges still account for it.
        self.offset_in_base = False
        self.reset_parameters()
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if self.is_quantized and getattr(base_layer, "quant_state", None) is None:
            # Keep the 4-bit quant state on the module too, as bitsandbytes does for the layers it
            # builds: FSDP2 replaces the weight (a Params4bit) with a plain gathered tensor in forward,
            # and from_bnb then finds the state here.
            base_layer.quant_state = getattr(base_layer.weight, "quant_state", None)

    def _default_param_dtype(self) -> torch.dtype:
        # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype=True): optimizer states stay
        # exact; the op casts A and B to the activation dtype per call.
        return torch.float32

    def reset_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a=√5), B zero, so the layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- base weight access -------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's LoRA layer exposes it (model code reads its dtype/device)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or ``None``)."""
        return self.base_layer.bias

    @property
    def is_quantized(self) -> bool:
        return is_bnb_4bit(self.base_layer)

    def base_weight(self) -> BaseWeight:
        """W0 as the op takes it: a dense ``[out, in]`` tensor (a view for Conv1D) or a 4-bit weight."""
        if is_dtensor(self.base_layer.weight):
            raise RuntimeError(
                f"fastlora: the base weight of layer {self.name or 'LoraLinear'} is sharded by FSDP2 (a DTensor) and is "
                "whole only inside the model's forward; merge or unpatch before fully_shard, or on a full "
                "(unsharded) copy of the model"
            )
        if self.is_quantized:
            return self._quant_view()
        w = self.base_layer.weight
        return w.t() if is_conv1d(self.base_layer) else w

    def _quant_view(self) -> QuantizedWeight:
        """``from_bnb`` of the base layer, rebuilt only when the weight parameter, its storage or dtype,
        or its quant state changed: otherwise a forward of a 4-bit layer spends ~15 µs of host time on
        it. Only a bitsandbytes ``Params4bit`` (which carries its state) is cached, keyed by the weight
        object itself and dropped with it (``model.to(...)`` and unpatching free the old storage); a
        plain tensor standing in for it (FSDP2's gathered weight) is rebuilt every call."""
        w = self.base_layer.weight
        qs = getattr(w, "quant_state", None)
        # Traced by torch.compile the view is built once per graph anyway (and Dynamo refuses to trace
        # the weak dictionary: a graph break under fullgraph=True).
        if qs is None or torch.compiler.is_compiling():
            return from_bnb(self.base_layer)
        key = (w.data_ptr(), w.dtype, id(qs), bool(getattr(qs, "packing_format_for_cpu", False)))
        cached = _QUANT_VIEWS.get(w)
        if cached is not None and cached[0] == key:
            return cached[1]
        view = from_bnb(self.base_layer)
        _QUANT_VIEWS[w] = (key, view, qs)  # qs held: its id in the key stays its own
        return view

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as a dense ``[out, in]`` tensor (dequantised for 4-bit bases)."""
        base = self.base_weight()
        if dtype is None:
            dtype = base.dtype
        return base_weight_dense(base, dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What the layer adds to its current base weight, as a dense ``[out, in]`` tensor.

        ``scaling·(B·A − B0·A0)`` when the frozen term is applied in forward, else ``scaling·B·A``.
        """
        delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype)
        if self.lora_A0 is not None and not self.offset_in_base:
            delta = delta - self.lora_B0.to(dtype) @ self.lora_A0.to(dtype)
        return delta * self.scaling

    def export(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, alpha)`` of a plain LoRA equal to this layer's update of the *original* W0.

        With a frozen term the rank doubles, ``A' = [A; A0]``, ``B' = [B, −B0]``, and alpha is raised
        so that the scaling is unchanged: ``2·alpha`` (alpha/r), or ``√2·alpha`` with rsLoRA
        (alpha/√r).

        Parameters sharded by FSDP2 are gathered whole: a collective every rank must call.
        """
        A, B = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
        if self.lora_A0 is None:
            return A, B, self.lora_alpha
        A = torch.cat([A, self.lora_A0.to(A.dtype)], dim=0)
        B = torch.cat([B, -self.lora_B0.to(B.dtype)], dim=1)
        alpha = self.lora_alpha * (math.sqrt(2.0) if self.use_rslora else 2.0)
        return A, B, alpha

    def set_frozen_offset(self, lora_A0: torch.Tensor | None, lora_B0: torch.Tensor | None) -> None:
        """Install (or clear, with ``None``) the frozen term subtracted from the update."""
        if (lora_A0 is None) != (lora_B0 is None):
            raise ValueError("fastlora: lora_A0 and lora_B0 must be given together")
        if lora_A0 is not None:
            if lora_A0.shape[1] != self.in_features or lora_B0.shape[0] != self.out_features:
                raise ValueError(f"fastlora: frozen offset shapes do not fit layer {self.name}")
            lora_A0 = lora_A0.detach().to(self.lora_A.device, self.lora_A.dtype)
            lora_B0 = lora_B0.detach().to(self.lora_B.device, self.lora_B.dtype)
        self.lora_A0, self.lora_B0 = lora_A0, lora_B0

    # -- forward ---------------------------------------------------------------------------------
    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if not self.is_quantized:
            w_dtype = self.base_layer.weight.dtype
            if not x.is_floating_point():  # token ids fed to a layer: converting the model is not the fix
                raise TypeError(
                    f"fastlora: layer {self.name or 'LoraLinear'} got {x.dtype} input; a linear layer takes float "
                    "activations (token ids go to the model, e.g. model(input_ids=ids), which embeds them)"
                )
            if x.dtype != w_dtype:
                raise TypeError(
                    f"fastlora: layer {self.name or 'LoraLinear'} has {w_dtype} weights but got {x.dtype} input; "
                    f"cast the input (x.to({w_dtype})) or the model (model.to({x.dtype})), or run under torch.autocast"
                )
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(self._width_error(x))
        dtype = self._compute_dtype(x)
        # A and B go to the op in their own dtype (fp32 by default): it casts them to x's itself.
        lora_A, lora_B = self.lora_A, self.lora_B
        if self.lora_A0 is not None and not self.offset_in_base:
            # Rank-2r op with the frozen half negated: W0 + s·(B·A − B0·A0) in one pass.
            lora_A = torch.cat([lora_A.to(dtype), self.lora_A0.to(dtype)], dim=0)
            lora_B = torch.cat([lora_B.to(dtype), -self.lora_B0.to(dtype)], dim=1)
        bias = self.base_layer.bias
        if bias is not None:
            bias = bias.to(dtype)
        p = self.dropout if self.training else 0.0
        # The seed is drawn on x's device from torch's RNG (torch.manual_seed makes runs repeatable) and
        # stays a tensor: the fused kernels read it from memory, so dropout needs no host sync (no graph
        # break under torch.compile; a prerequisite of CUDA-graph capture). int32, 31 bits, as the kernels use.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=x.device) if p > 0.0 else 0
        base = self.base_weight()
        if isinstance(base, torch.Tensor):
            base = base.to(dtype)
        return lora_linear(x.to(dtype), base, lora_A, lora_B, self.scaling, bias, p, seed)

    def _width_error(self, x: torch.Tensor) -> str:
        return (
            f"fastlora: layer {self.name or 'LoraLinear'} ({self.in_features}->{self.out_features}) expects inputs "
            f"of width {self.in_features} in the last dimension, got shape {tuple(x.shape)}"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
            f"quantized={self.is_quantized}"
        )
