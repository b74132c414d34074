"""``fastlora.fully_shard``: FSDP2 for a patched model (LoRA sharded; the frozen base sharded or replicated).

Kept apart from :mod:`fastlora._dist` (which the layer itself imports) because it needs the layer,
the patching registry and the 4-bit storage helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer import LoraLinear
from .patching import lora_layers
from .quant import set_quant_storage

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["FSDP_BASES", "decoder_blocks", "fully_shard"]

FSDP_BASES = ("shard", "replicate")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the ``nn.ModuleList`` holding the most LoRA layers."""
    best: list[nn.Module] = []
    best_count = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        count = sum(isinstance(m, LoraLinear) for m in module.modules())
        if count > best_count:
            best, best_count = list(module), count
    return best


def fully_shard(
    model: nn.Module,
    *,
    base: str = "shard",
    reshard_after_forward: bool = True,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    blocks: list[nn.Module] | None = None,
    prefetch: int = 1,
) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) for a fastlora-patched model, LoRA-aware.

    Call it on every rank after :func:`fastlora.patch` and before building the optimizer. It shards
    one unit per decoder block, one for the input embeddings and one for the output head (when not
    tied: the head's all-gather is then prefetched during the last block instead of being part of
    the root's, before the first layer), then the root. The LoRA parameters are always sharded (with their gradients and
    optimizer state); what happens to the frozen base is ``base``:

    * ``"shard"``: sharded like any parameter and all-gathered around each unit's forward and
      backward. bitsandbytes 4-bit weights are shared as their packed bytes: they are first stored
      as ``mp_policy.param_dtype`` (bf16 without a policy; :func:`fastlora.quant.set_quant_storage`,
      no copy), as FSDP2 needs floating-point parameters (torch < 2.13 refuses uint8 ones) and must
      not cast the bytes.
    * ``"replicate"``: every frozen parameter stays whole on every rank (FSDP2 ``ignored_params``):
      no all-gather traffic for it, DDP's memory for the base.

    Measured on 2 H200s (8 layers of Llama-8B, bf16; README "Multi-GPU"): for a base that fits on one
    GPU, DDP scales best; among FSDP2 layouts ``reshard_after_forward=False`` came first, and
    ``"replicate"`` was no faster than sharding, which suggests that FSDP2's per-unit work, more than
    the all-gather volume, is its overhead there.

    Args:
        model: a patched model, already on this rank's device.
        base: see above.
        reshard_after_forward: free the blocks' gathered weights after forward (torch's default);
            ``False`` keeps them until backward: one all-gather per block per step instead of two,
            at the memory of the whole unsharded base.
        mesh: the 1-D ``DeviceMesh`` to shard over (default: all ranks).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy``, passed on.
        blocks: the modules to shard as units (default: the ``nn.ModuleList`` holding the most LoRA
            layers, e.g. ``model.model.layers``).
        prefetch: how many units ahead to all-gather in forward (0: FSDP2's implicit prefetching
            only). Backward keeps FSDP2's own one-block prefetch: with an explicit one on top, the
            first H200 run of this layout was slower than torch's plain per-block layout.

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not lora_layers(model):
        raise ValueError("fastlora.fully_shard: the model has no fastlora layers; call fastlora.patch(model) first")
    if blocks is None:
        blocks = decoder_blocks(model)
        if not blocks:
            raise ValueError(
                "fastlora.fully_shard: found no nn.ModuleList of LoRA-patched blocks; pass blocks=[...] "
                "(e.g. blocks=list(model.model.layers))"
            )
    if base not in FSDP_BASES:
        raise ValueError(f"fastlora.fully_shard: base must be one of {', '.join(FSDP_BASES)}, got {base!r}")
    ignored: set[nn.Parameter] | None = None
    if base == "replicate":
        ignored = {p for p in model.parameters() if not p.requires_grad}
    else:
        storage = getattr(mp_policy, "param_dtype", None) or torch.bfloat16
        set_quant_storage(model, storage)
    kwargs: dict = dict(ignored_params=ignored)
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        torch_fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    if embed is not None and not tied:
        torch_fully_shard(embed, reshard_after_forward=True, **kwargs)
    if head is not None and not tied:
        # The head's backward follows its forward at once: freeing it in between would only add an all-gather.
        torch_fully_shard(head, reshard_after_forward=False, **kwargs)
    torch_fully_shard(model, **kwargs)
    if prefetch > 0:
        units = list(blocks) + ([head] if head is not None and not tied else [])
        for i, unit in enumerate(units[:-1]):
            unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + prefetch])
    return model
