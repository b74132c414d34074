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

__all__ = ["FSDP_BASES", "FSDP_LORA", "decoder_blocks", "fully_shard"]

FSDP_BASES = ("shard", "replicate")
FSDP_LORA = ("shard", "replicate")


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
    lora: str = "shard",
    reshard_after_forward: bool | int = True,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    blocks: list[nn.Module] | None = None,
    blocks_per_unit: int | None = 1,
    prefetch: int = 1,
    backward_prefetch: int = 0,
    keep_embeddings: bool = False,
) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) for a fastlora-patched model, LoRA-aware.

    Call it on every rank after :func:`fastlora.patch` and before building the optimizer. It shards
    the decoder blocks as units of ``blocks_per_unit`` consecutive blocks, one unit for the input
    embeddings and one for the output head (when not tied: the head's all-gather is then prefetched
    during the last blocks instead of being part of the root's, before the first layer), then the
    root. What happens to the frozen base is ``base``:

    * ``"shard"``: sharded like any parameter and all-gathered around each unit's forward and
      backward. bitsandbytes 4-bit weights are shared as their packed bytes: they are first stored
      as ``mp_policy.param_dtype`` (bf16 without a policy; :func:`fastlora.quant.set_quant_storage`,
      no copy), as FSDP2 needs floating-point parameters (torch < 2.13 refuses uint8 ones) and must
      not cast the bytes.
    * ``"replicate"``: every frozen parameter stays whole on every rank (FSDP2 ``ignored_params``):
      no all-gather traffic for it, DDP's memory for the base. Only the LoRA parameters are
      gathered (fp32: 4 bytes x r x (in + out) per layer); ``blocks_per_unit=None`` then gathers
      them all once per step and reduce-scatters their gradients once, after backward.

    and what happens to the trainable parameters (LoRA's, and any other left trainable) is ``lora``:

    * ``"shard"``: sharded with their gradients and optimizer state; every unit reduce-scatters
      its LoRA gradients after its backward, and the next unit's backward waits for that.
    * ``"replicate"``: whole on every rank, as under DDP (FSDP2 ignores them): rank 0's values are
      broadcast to the others here, and their gradients are averaged over the ranks by one flat
      all-reduce per backward, after it (~40 MB for r=16 on all linears of Llama-8B). With ``base="shard"`` the units then hold only frozen weights:
      FSDP2 all-gathers them and never reduce-scatters. LoRA and its AdamW state cost ~16 bytes
      per LoRA parameter per GPU instead of 16/N; each backward all-reduces, also under gradient
      accumulation.

    Measured on 2 H200s (8 layers of Llama-8B, 2x2048 tokens per GPU; README "Multi-GPU"): for a
    base that fits on one GPU, DDP scales best (98 % of two unwrapped GPUs); these defaults gave
    81 % (bf16) / 88 % (NF4), and ``reshard_after_forward=False, blocks_per_unit=2,
    keep_embeddings=True, lora="replicate"`` (with a CTA-capped NCCL mesh) 89 % / 91 % at ~1.5-4 GiB
    more per GPU. FSDP2's steps there were host-bound (its per-unit hooks), so fewer units help most.

    Args:
        model: a patched model, already on this rank's device.
        base: see above.
        lora: see above.
        reshard_after_forward: free the blocks' gathered weights after forward (torch's default);
            ``False`` keeps them until backward: one all-gather per unit per step instead of two, at
            the memory of the whole unsharded base. An int ``k`` (torch's option) keeps them sharded
            over ``k`` ranks in between (``k`` divides the mesh size).
        mesh: the 1-D ``DeviceMesh`` to shard over (default: all ranks). Its process group's
            options apply to every collective, e.g. an NCCL group with ``config.max_ctas`` set
            bounds the SMs the all-gathers take from the overlapped GEMMs.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy``, passed on. ``param_dtype=torch.bfloat16``
            gathers the fp32 LoRA weights as bf16 (the op computes in bf16 anyway, so the forward is
            unchanged; their gradients are then produced in bf16); ``reduce_dtype`` is the dtype of
            the LoRA gradients' reduce-scatter (default: the gradients' own).
        blocks: the decoder blocks, in forward order (default: the ``nn.ModuleList`` holding the
            most LoRA layers, e.g. ``model.model.layers``).
        blocks_per_unit: consecutive blocks sharded (all-gathered, reduce-scattered) as one unit;
            the last unit may hold fewer. Fewer, larger units mean fewer collectives, hooks and
            rank synchronisations per step, at the memory of that many gathered blocks (times the
            prefetch depth). ``None``: all blocks in one unit.
        prefetch: how many units ahead to all-gather in forward (0: FSDP2's implicit prefetching
            only).
        backward_prefetch: how many units ahead to all-gather in backward (0: FSDP2's implicit
            one-unit prefetch). Has no effect with ``reshard_after_forward=False`` (backward then
            gathers nothing). With an explicit one-block prefetch on top of the implicit one, the
            first H200 run of this layout was slower than torch's plain per-block layout.
        keep_embeddings: keep the input embeddings' unit gathered from the first forward on (the
            table is frozen and only read): its all-gather, the first op of every step, where
            nothing can hide it, happens once instead of every step, for (1 - 1/N) of the table's
            memory per GPU. Only with ``base="shard"`` and untied embeddings (otherwise nothing to
            keep).

    Returns:
        ``model``, sharded in place.

    Raises:
        ValueError: the model is not patched, no blocks are found, or an option has a bad value.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not lora_layers(model):
        raise ValueError("fastlora.fully_shard: the model has no fastlora layers; call fastlora.patch(model) first")
    _check_options(base, lora, reshard_after_forward, blocks_per_unit, prefetch, backward_prefetch)
    if blocks is None:
        blocks = decoder_blocks(model)
        if not blocks:
            raise ValueError(
                "fastlora.fully_shard: found no nn.ModuleList of LoRA-patched blocks; pass blocks=[...] "
                "(e.g. blocks=list(model.model.layers))"
            )
    blocks = list(blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ignored: set[nn.Parameter] = set(trainable) if lora == "replicate" else set()
    if base == "replicate":
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    else:
        storage = getattr(mp_policy, "param_dtype", None) or torch.bfloat16
        set_quant_storage(model, storage)
    kwargs: dict = dict(ignored_params=ignored or None)
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    size = len(blocks) if blocks_per_unit is None else blocks_per_unit
    groups = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    # A unit is addressed by its first module (FSDP2 keeps one state per group of modules).
    units: list[nn.Module] = []
    for group in groups:
        torch_fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard_after_forward, **kwargs)
        units.append(group[0])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    if embed is not None and not tied and _has_managed_params(embed, ignored):
        torch_fully_shard(embed, reshard_after_forward=not keep_embeddings, **kwargs)
        if keep_embeddings:
            embed.set_reshard_after_backward(False)
    if head is not None and not tied and _has_managed_params(head, ignored):
        # The head's backward follows its forward at once: freeing it in between would only add an all-gather.
        torch_fully_shard(head, reshard_after_forward=False, **kwargs)
        units.append(head)
    torch_fully_shard(model, **kwargs)
    if prefetch > 0:
        for i, unit in enumerate(units[:-1]):
            unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + prefetch])
    if backward_prefetch > 0:
        backward = units[::-1]
        for i, unit in enumerate(backward[:-1]):
            unit.set_modules_to_backward_prefetch(backward[i + 1 : i + 1 + backward_prefetch])
    if lora == "replicate":
        _GradAverage(trainable, mesh.get_group() if mesh is not None else None)
    return model


class _GradAverage:
    """Averages the gradients of ``params`` over ``group`` after each backward: one flat all-reduce per dtype.

    DDP's job for parameters FSDP2 does not manage, including DDP's start: rank 0's values are
    broadcast first, so ranks that initialised LoRA with different seeds still train one model.
    Queued as an autograd-engine callback by the first gradient to arrive, so it runs once per
    backward, after every gradient is accumulated. A parameter without a gradient on this rank
    counts as zero and gets the average, so every rank leaves backward with the same gradients.
    The hooks keep this object alive.
    """

    def __init__(self, params: list[nn.Parameter], group: object | None) -> None:
        import torch.distributed as dist

        self.group, self.queued = group, False
        self.by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            self.by_dtype.setdefault(p.dtype, []).append(p)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.no_grad():
            for same in self.by_dtype.values():
                flat = torch.cat([p.reshape(-1) for p in same])
                dist.broadcast(flat, src=src, group=group)
                for p, value in zip(same, flat.split([p.numel() for p in same])):
                    p.copy_(value.view_as(p))
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    @torch.no_grad()
    def _average(self) -> None:
        import torch.distributed as dist

        self.queued = False
        world = dist.get_world_size(self.group)
        for params in self.by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat, group=self.group)
            flat.div_(world)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                if p.grad is None:
                    p.grad = g.view_as(p).clone()
                else:
                    p.grad.copy_(g.view_as(p))


def _has_managed_params(module: nn.Module, ignored: set[nn.Parameter] | None) -> bool:
    """Whether FSDP2 would manage any of ``module``'s parameters (a unit of only ignored ones is pointless)."""
    return any(ignored is None or p not in ignored for p in module.parameters())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(
    base: str,
    lora: str,
    reshard_after_forward: object,
    blocks_per_unit: object,
    prefetch: object,
    backward_prefetch: object,
) -> None:
    """Refuse option values torch would misread or reject late (mid-way through sharding the model)."""
    where = "fastlora.fully_shard"
    if base not in FSDP_BASES:
        raise ValueError(f"{where}: base must be one of {', '.join(FSDP_BASES)}, got {base!r}")
    if lora not in FSDP_LORA:
        raise ValueError(f"{where}: lora must be one of {', '.join(FSDP_LORA)}, got {lora!r}")
    if base == lora == "replicate":
        raise ValueError(
            f"{where}: base='replicate' with lora='replicate' leaves nothing to shard; use "
            "torch.nn.parallel.DistributedDataParallel(model) for that"
        )
    if not isinstance(reshard_after_forward, bool) and not (
        _is_int(reshard_after_forward) and reshard_after_forward >= 1
    ):
        raise ValueError(
            f"{where}: reshard_after_forward must be True, False or a number of ranks >= 1, got {reshard_after_forward!r}"
        )
    if blocks_per_unit is not None and not (_is_int(blocks_per_unit) and blocks_per_unit >= 1):
        raise ValueError(
            f"{where}: blocks_per_unit must be an int >= 1 (blocks per FSDP unit) or None (all blocks in one unit), "
            f"got {blocks_per_unit!r}"
        )
    for name, value in (("prefetch", prefetch), ("backward_prefetch", backward_prefetch)):
        if not (_is_int(value) and value >= 0):
            raise ValueError(f"{where}: {name} must be an int >= 0 (units to all-gather ahead), got {value!r}")
