"""Triton kernels for fastlora (installed as ``fastlora.kernels``; no model knowledge here).

* :func:`dequant_4bit` -- bitsandbytes NF4/FP4 storage (double quantisation included) to a dense
  matrix, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
* :func:`lora_down`, :func:`lora_bwd_aux`, :func:`lora_up_add` -- the LoRA-only passes that apply
  dropout (a Philox keep-mask regenerated from a seed, never stored) or build the forward's
  concatenated operand.

Every kernel launches with one fixed, measured config (no autotuner on the launch path) through
:func:`launcher`, so the same launch sites run eagerly and inside ``torch.library.triton_op`` bodies
that torch.compile traces.
"""

from ._common import NF4_LOOKUPS, Packed4bit, interpreting, launcher, seed_tensor
from .dequant import dequant_4bit, dequant_group, dequant_packed, groupable
from .lora_aux import dropout_keep_mask, lora_bwd_aux, lora_down, lora_up_add

__all__ = [
    "NF4_LOOKUPS",
    "Packed4bit",
    "dequant_4bit",
    "dequant_group",
    "dequant_packed",
    "dropout_keep_mask",
    "groupable",
    "interpreting",
    "launcher",
    "lora_bwd_aux",
    "lora_down",
    "lora_up_add",
    "seed_tensor",
]
