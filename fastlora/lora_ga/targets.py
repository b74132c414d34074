"""Which layers LoRA-GA estimates, and the facts about them every later stage needs.

The first stage of the one-way flow ``targets → estimation (accumulators, sketch, offload) → init``:
a patched model's targets are its :class:`~fastlora.LoraLinear` layers, an unpatched model's are
the linear layers :func:`fastlora.patch` would wrap (:func:`fastlora.patching.select_targets`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import nn

from ..layer import LoraLinear, base_features
from ..patching import TargetSpec, lora_layers, matches_target, select_targets

__all__ = ["accumulation_dtype", "default_targets", "module_device", "target_shapes", "weight_dtype"]


def default_targets(model: nn.Module, target_modules: TargetSpec, exclude: TargetSpec) -> dict[str, nn.Module]:
    """``{name: module}`` to estimate: the LoRA layers of a patched model (narrowed by
    ``target_modules``/``exclude`` when given), else the layers ``patch`` would choose."""
    layers = lora_layers(model)
    if not layers:
        return {name: model.get_submodule(name) for name in select_targets(model, target_modules, exclude)}
    if target_modules not in (None, "all-linear"):
        layers = {n: m for n, m in layers.items() if matches_target(n, target_modules)}
    if exclude is not None:
        layers = {n: m for n, m in layers.items() if not matches_target(n, exclude)}
    return dict(layers)


def target_shapes(targets: Mapping[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}``: the shape of each target's weight gradient."""
    shapes = {}
    for name, module in targets.items():
        n_in, n_out = base_features(module.base_layer if isinstance(module, LoraLinear) else module)
        shapes[name] = (n_out, n_in)
    return shapes


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without any)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a target's base weight (fp32 when it has no plain weight tensor)."""
    base = module.base_layer if isinstance(module, LoraLinear) else module
    w = getattr(base, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


def accumulation_dtype(targets: Mapping[str, nn.Module]) -> torch.dtype:
    """fp64 when every target is fp64 (the exactness tests), else fp32: the dtype sums are kept in."""
    return torch.float64 if {weight_dtype(m) for m in targets.values()} == {torch.float64} else torch.float32
