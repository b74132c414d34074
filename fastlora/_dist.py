"""Helpers for running under ``torch.distributed`` (DDP, FSDP2); no import cost without it.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter it manages into a sharded
``DTensor``; inside the module's forward it swaps in the full, plain tensors, so the LoRA op never
sees a shard. Outside forward (saving, merging) a sharded parameter must be gathered explicitly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache  # is_dtensor runs in every LoraLinear forward
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> bool:
    """True for a ``DTensor`` (e.g. a parameter sharded by FSDP2, outside its module's forward)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a ``DTensor``.

    For a sharded ``DTensor`` this is an all-gather: a collective that every rank of its mesh must
    call, in the same order.
    """
    return t.full_tensor() if is_dtensor(t) else t


def is_main_process() -> bool:
    """True unless ``torch.distributed`` is initialised and this is not rank 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (whose names carry a ``module.`` prefix)."""
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module
    return model
