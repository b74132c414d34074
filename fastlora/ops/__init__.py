"""The LoRA linear op and its backend dispatch.

``lora_linear`` is the single op every :class:`fastlora.LoraLinear` calls. It routes to the fused
Triton implementation (``fastlora.ops.fused``, when present and chosen by the backend switch) or to
the pure-PyTorch reference in :mod:`fastlora.ops.reference`.
"""

from __future__ import annotations

import importlib

import torch

from .. import _backend
from .reference import BaseWeight, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference", "triton_available"]

_fused = None
_fused_error: str | None = None


def _load_fused():
    global _fused, _fused_error
    if _fused is None and _fused_error is None:
        try:
            _fused = importlib.import_module("fastlora.ops.fused")
        except ImportError as exc:  # triton missing, or the kernels are not built yet
            _fused_error = f"{type(exc).__name__}: {exc}"
    return _fused


def triton_available() -> bool:
    """Whether the fused Triton LoRA kernels can be imported in this environment."""
    return _load_fused() is not None


def lora_linear(
    x: torch.Tensor,
    base: BaseWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """``x·W0ᵀ + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ (+ bias)``, on the backend in force.

    See :func:`fastlora.ops.reference.lora_linear_reference` for the argument contract.
    """
    backend = _backend.current()
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        fused = _load_fused()
        if fused is not None and fused.supports(x, base, lora_A, lora_B, bias, dropout_p):
            return fused.lora_linear_fused(x, base, lora_A, lora_B, scaling, bias, dropout_p, seed)
        if backend == "triton":
            why = _fused_error or "this input is not supported by the fused kernels"
            raise RuntimeError(f"fastlora: FASTLORA_BACKEND=triton but the Triton path cannot run ({why})")
    return lora_linear_reference(x, base, lora_A, lora_B, scaling, bias, dropout_p, seed)
