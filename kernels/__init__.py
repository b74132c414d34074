"""Triton kernels for fastlora (installed as ``fastlora.kernels``; no model knowledge here).

* :func:`dequant_4bit` -- bitsandbytes NF4/FP4 storage (double quantisation included) to a dense
  matrix, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
* :func:`lora_fwd_fused` / :func:`lora_dx_fused` -- base GEMM + LoRA term in one kernel, W0 dense
  or 4-bit (dequantised tile by tile in registers).
* :func:`lora_fwd_small` -- the forward for few rows (decode, eval) on a 4-bit W0: codes read as
  32-bit words, decoded by warp shuffles, split over K.
* :func:`lora_down`, :func:`lora_bwd_aux`, :func:`lora_up_add` -- the LoRA-only passes.

Autotuned kernels take their configs from one function each; ``FASTLORA_TRITON_CONFIG_<KERNEL>``
pins one (see :func:`fastlora.kernels._common.pinned_config`). ``FASTLORA_NF4_LOOKUP`` /
:func:`set_nf4_lookup` pick how 4-bit codes become values ("auto", the default: the fastest per kernel as measured;
"select" tree; "gather"; "gather1d").
"""

from ._common import NF4_LOOKUPS, Packed4bit, interpreting, nf4_lookup, seed_tensor, set_nf4_lookup
from .dequant import dequant_4bit
from .lora_aux import down_splits, dropout_keep_mask, lora_bwd_aux, lora_down, lora_up_add
from .lora_gemm import lora_dx_fused, lora_fwd_fused
from .lora_small import lora_fwd_small, small_lookup, small_supported

__all__ = [
    "NF4_LOOKUPS",
    "Packed4bit",
    "dequant_4bit",
    "down_splits",
    "dropout_keep_mask",
    "interpreting",
    "lora_bwd_aux",
    "lora_down",
    "lora_dx_fused",
    "lora_fwd_fused",
    "lora_fwd_small",
    "lora_up_add",
    "nf4_lookup",
    "seed_tensor",
    "set_nf4_lookup",
    "small_lookup",
    "small_supported",
]
