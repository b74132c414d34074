"""Finding the decoder blocks whose LoRA layers run as grouped ops, and routing them there.

Recognised by module structure (the attribute names Hugging Face decoder models share), after
:func:`fastlora.patch` has wrapped the projections in :class:`~fastlora.LoraLinear`:

* **attention q/k/v** -- a module with ``q_proj``, ``k_proj`` and ``v_proj`` that are all
  ``LoraLinear`` over the same input width and the same kind of base weight (Llama, Mistral,
  Qwen2/Qwen3, Gemma/Gemma2, ...). The attention's own forward is untouched: the first of the three
  projections to be called computes all three outputs with one op
  (:func:`fastlora.grouped.grouped_linear`) and hands its siblings theirs when they are called with
  the very same input tensor. The cache lives for one call of the attention module (a forward
  hook clears it, also on an exception), so nothing outlives a forward. A sibling called with
  another tensor (cross-attention) turns the grouping off for that module for good.
* **gated MLP** -- a module with ``gate_proj``/``up_proj``/``down_proj`` (or Phi-3's
  ``gate_up_proj``/``down_proj``) and an ``act_fn``/``activation_fn`` equal to SiLU or GELU-tanh:
  its forward becomes :func:`fastlora.grouped.gated_mlp`, once a probe input has shown that the
  module's own forward computes ``down(act(gate(x)) · up(x))``.

Phi-3's ``qkv_proj`` is already one layer; o_proj and anything not recognised stay per-layer.
Each projection stays its own ``LoraLinear`` with its own ``lora_A``/``lora_B``, so saving, loading,
unpatching, optimizers, DDP and FSDP2 see exactly what they see without grouping. Under
``torch.compile`` the grouped paths step aside and every projection runs its own ``LoraLinear``
op (a registered custom op that compiles without graph breaks; the grouped ops are eager code).
"""

from __future__ import annotations

import torch
from torch import nn

from .grouped import activation_kind, gated_mlp, grouped_linear, grouping_blocker
from .layer import LoraLinear

__all__ = ["fuse_blocks", "fused_blocks", "unfuse_blocks"]

_QKV = ("q_proj", "k_proj", "v_proj")
_ACT_NAMES = ("act_fn", "activation_fn")


def _compatible(members: list[LoraLinear], same_input: bool = True) -> bool:
    first = members[0]
    if same_input and any(m.in_features != first.in_features for m in members):
        return False
    if any(m.is_quantized != first.is_quantized for m in members):
        return False
    if not first.is_quantized and any(m.base_layer.weight.dtype != first.base_layer.weight.dtype for m in members):
        return False
    return all(m.base_layer.weight.device == first.base_layer.weight.device for m in members)


class _QKVGroup:
    """The q/k/v projections of one attention module and the outputs computed for the current call."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.cache: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        self.disabled: str | None = None  # why grouping was turned off at run time

    def clear(self, *_: object) -> None:
        self.cache = None

    def call(self, index: int, x: torch.Tensor) -> torch.Tensor:
        member = self.members[index]
        if self.disabled or torch.compiler.is_compiling():
            return LoraLinear.forward(member, x)
        cache = self.cache
        if cache is not None:
            if cache[0] is x and cache[1][index] is not None:
                out, cache[1][index] = cache[1][index], None
                if all(o is None for o in cache[1]):
                    self.cache = None
                return out
            if cache[0] is not x and any(o is not None for o in cache[1]):
                # A sibling read another input (e.g. cross-attention): these are not one group.
                self.disabled = "the projections were called with different inputs"
                self.cache = None
                return LoraLinear.forward(member, x)
            if cache[0] is x:  # the same projection called twice on one input: compute it alone
                return LoraLinear.forward(member, x)
        if _one_row(x) or grouping_blocker(self.members) is not None:
            return LoraLinear.forward(member, x)
        outs: list[torch.Tensor | None] = list(grouped_linear(x, self.members))
        out, outs[index] = outs[index], None
        self.cache = (x, outs)
        return out


class _MemberForward:
    """A q/k/v projection's ``forward`` while it belongs to a group."""

    def __init__(self, group: _QKVGroup, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.call(self.index, x)


def _one_row(x: torch.Tensor) -> bool:
    """A single token (decoding): the per-layer op has a 4-bit kernel for it that never dequantises
    W0, where the grouped op dequantises every weight of the group."""
    return x.numel() <= x.shape[-1]


def _hooked(members: list[LoraLinear]) -> bool:
    """Whether a forward hook watches one of the layers (e.g. LoRA-GA's gradient estimate): the fused
    MLP never calls its layers, so it steps aside to let the hooks see their inputs and outputs."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in members) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )


class _MLPForward:
    """A gated MLP module's ``forward``: the fused op, or the module's own forward where it cannot run."""

    def __init__(self, module: nn.Module, gate_up: list[LoraLinear], down: LoraLinear, kind: str) -> None:
        self.module, self.gate_up, self.down, self.kind = module, gate_up, down, kind

    def original(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.module).forward(self.module, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        members = [*self.gate_up, self.down]
        if torch.compiler.is_compiling() or _one_row(x) or _hooked(members) or grouping_blocker(members) is not None:
            return self.original(x)
        return gated_mlp(x, self.gate_up, self.down, self.kind)


def _mlp_parts(module: nn.Module) -> tuple[list[LoraLinear], LoraLinear, str] | None:
    down = getattr(module, "down_proj", None)
    if not isinstance(down, LoraLinear):
        return None
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    if isinstance(gate, LoraLinear) and isinstance(up, LoraLinear):
        gate_up = [gate, up]
        if gate.out_features != up.out_features:
            return None
    elif isinstance(getattr(module, "gate_up_proj", None), LoraLinear):
        gate_up = [module.gate_up_proj]
        if gate_up[0].out_features % 2:
            return None
    else:
        return None
    width = sum(m.out_features for m in gate_up) // 2
    if down.in_features != width or down.out_features != gate_up[0].in_features:
        return None
    if not (_compatible(gate_up) and _compatible([*gate_up, down], same_input=False)):
        return None
    kind = next((k for k in (activation_kind(getattr(module, a, None)) for a in _ACT_NAMES) if k), None)
    if kind is None:
        return None
    return gate_up, down, kind


@torch.no_grad()
def _probe(module: nn.Module, fused: _MLPForward) -> bool:
    """Does the module's own forward compute what the fused op computes? (a tiny random input)"""
    layer = fused.gate_up[0]
    dtype = torch.float32 if layer.is_quantized else layer.base_layer.weight.dtype
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0)).to(layer.lora_A.device, dtype)
    modes = [m.training for m in module.modules()]
    module.eval()  # no dropout in the comparison
    try:
        ref, out = fused.original(x), gated_mlp(x, fused.gate_up, fused.down, fused.kind)
    except Exception:
        return False
    finally:
        for m, mode in zip(module.modules(), modes):
            m.training = mode
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor) and ref.shape == out.shape):
        return False
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    scale = ref.float().abs().max().clamp_min(1e-6)
    return bool(((ref.float() - out.float()).abs().max() / scale) <= tol)


def fuse_blocks(model: nn.Module) -> dict[str, str]:
    """Route the recognised blocks of a patched ``model`` through the grouped ops (idempotent).

    Returns:
        ``{module name: "qkv" | "gated_mlp"}`` of every block now fused.
    """
    unfuse_blocks(model)
    probed: dict[type, bool] = {}
    fused: dict[str, str] = {}
    for name, module in model.named_modules():
        qkv = [getattr(module, n, None) for n in _QKV]
        if all(isinstance(m, LoraLinear) for m in qkv) and _compatible(qkv):
            group = _QKVGroup(qkv)
            for i, m in enumerate(qkv):
                m.forward = _MemberForward(group, i)
            handle = module.register_forward_hook(group.clear, always_call=True)
            module._fastlora_qkv = (group, handle.id)
            fused[name] = "qkv"
        parts = _mlp_parts(module)
        if parts is not None:
            fwd = _MLPForward(module, *parts)
            ok = probed.get(type(module))
            if ok is None:
                ok = probed[type(module)] = _probe(module, fwd)
            if ok:
                module.forward = fwd
                fused[name] = "gated_mlp"
    return fused


def fused_blocks(model: nn.Module) -> dict[str, str]:
    """``{module name: "qkv" | "gated_mlp"}`` of the blocks of ``model`` that run grouped."""
    out = {}
    for name, module in model.named_modules():
        if "_fastlora_qkv" in module.__dict__:
            out[name] = "qkv"
        if isinstance(module.__dict__.get("forward"), _MLPForward):
            out[name] = "gated_mlp"
    return out


def unfuse_blocks(model: nn.Module) -> None:
    """Put every fused block of ``model`` back on its per-layer path."""
    for module in model.modules():
        entry = module.__dict__.pop("_fastlora_qkv", None)
        if entry is not None:
            module._forward_hooks.pop(entry[1], None)
            if hasattr(module, "_forward_hooks_always_called"):
                module._forward_hooks_always_called.pop(entry[1], None)
        if isinstance(module.__dict__.get("forward"), (_MemberForward, _MLPForward)):
            del module.forward
