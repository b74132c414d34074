"""LoRA-GA: gradient-approximation init for LoRA, ``fastlora.patch(model, method="lora_ga", data=...)``.

One way through, each module using only the ones before it:

* :mod:`.targets`: which layers (a patched model's LoRA layers, else those ``patch`` would wrap);
* :mod:`.products`, :mod:`.accumulators`, :mod:`.sketch`: what is summed per batch (dense fp32
  sums beside the layers or in host memory; randomized sketches with an a-posteriori error estimate);
* :mod:`.offload`: the ``offload`` argument resolved once (host sums, block streaming);
* :mod:`.estimate`: the one estimation loop, :func:`estimate_gradient`;
* :mod:`.init`: SVD, directions, scales, offsets (and the first-step alignment metric);
* :mod:`.method`: the ``lora_ga`` method, registered with :func:`fastlora.register_method` on import.
"""

from __future__ import annotations

from .accumulators import DenseAccumulator, GradientAccumulator, HostAccumulator
from .estimate import GradientEstimate, LossFn, estimate_gradient
from .init import (
    DIRECTIONS,
    OFFSETS,
    SCALES,
    apply_offset,
    factors_from_singular,
    first_step_alignment,
    lora_ga_factors,
    offset_in_base,
    randomized_svd,
    scale_factor,
    select_directions,
    top_singular,
)
from .method import init_lora_ga
from .offload import BlockOffloader, OffloadPlan, find_blocks, resolve_offload
from .products import mm_wide, outer_fp32
from .sketch import (
    LowRankGradient,
    RangeAccumulator,
    SketchAccumulator,
    SketchedGradient,
    auto_sketch_size,
)

__all__ = [
    "DIRECTIONS",
    "OFFSETS",
    "SCALES",
    "BlockOffloader",
    "DenseAccumulator",
    "GradientAccumulator",
    "GradientEstimate",
    "HostAccumulator",
    "LossFn",
    "LowRankGradient",
    "OffloadPlan",
    "RangeAccumulator",
    "SketchAccumulator",
    "SketchedGradient",
    "apply_offset",
    "auto_sketch_size",
    "estimate_gradient",
    "factors_from_singular",
    "find_blocks",
    "first_step_alignment",
    "init_lora_ga",
    "lora_ga_factors",
    "mm_wide",
    "offset_in_base",
    "outer_fp32",
    "randomized_svd",
    "resolve_offload",
    "scale_factor",
    "select_directions",
    "top_singular",
]
