"""fastlora: fast, memory-lean LoRA / QLoRA fine-tuning for PyTorch and Hugging Face models.

Public API::

    model = fastlora.patch(model, method="lora", r=16, alpha=32)   # or method="lora_ga", data=...
    fastlora.save_adapter(model, "out/")                          # a plain PEFT LoRA adapter
    model = fastlora.load_adapter(base_model, "out/")
    model = fastlora.unpatch(model, merge=True)

Only torch is needed to import fastlora; bitsandbytes, transformers, peft and triton are used
when present.
"""

from __future__ import annotations

from ._backend import get_backend, set_backend
from ._version import __version__
from .adapter import load_adapter, save_adapter
from .fsdp import fully_shard
from .layer import LoraLinear
from .lora_ga import GradientEstimate, estimate_gradient
from .patching import lora_layers, patch, register_method, unpatch
from .quant import QuantizedWeight, dequantize, quantize_4bit
from .trainer import TrainerMixin

__all__ = [
    "GradientEstimate",
    "LoraLinear",
    "QuantizedWeight",
    "TrainerMixin",
    "__version__",
    "dequantize",
    "estimate_gradient",
    "fully_shard",
    "get_backend",
    "load_adapter",
    "lora_layers",
    "patch",
    "quantize_4bit",
    "register_method",
    "save_adapter",
    "set_backend",
    "unpatch",
]
