"""Offload for gradient estimation: where the sums live, and streaming a float model bigger than the GPU.

:func:`resolve_offload` interprets the ``offload`` argument of :func:`fastlora.estimate_gradient`
once, into an :class:`OffloadPlan` that every pass of an estimate shares (a two-pass sketch streams
its blocks through the same :class:`BlockOffloader` twice; nothing is built or pinned twice).

Block offload, the rest of this module: the model runs one block at a time.

The model's transformer blocks (Hugging Face ``_no_split_modules``, or given) stay in pinned host
memory; everything else (embeddings, final norm, head) moves to the compute device for the duration.
While block ``i`` computes, block ``i+1`` is copied on a separate copy stream; in backward the order is
reversed (block ``i-1`` is prefetched while block ``i`` runs its backward). The last block stays on
the device from its forward to its backward, and the first stays for the next batch, so each batch
moves every block once forward and once backward except those two. Peak device memory is about
three blocks (first, current, prefetched) plus activations.

Weights are frozen while the offloader is active (gradient estimation), so evicting a block costs
nothing: the device copy is dropped and the parameter points at its pinned host tensor again.

Autograd may have *saved* a block's weights for backward (a frozen ``nn.Linear`` saves its weight to
compute ``dX``; a norm its scale). Those references would keep evicted device copies alive, so a
``saved_tensors_hooks`` pair stores such tensors as "parameter j of block i, with this view" and
resolves them against the block's device copy when backward runs (by which time it is resident again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..quant import is_bnb_4bit
from .targets import module_device

__all__ = ["OFFLOAD_CHOICES", "BlockOffloader", "OffloadPlan", "find_blocks", "resolve_offload"]

OFFLOAD_CHOICES = (None, "cpu", "blocks")


def find_blocks(model: nn.Module, blocks: Sequence[nn.Module] | Sequence[str] | None = None) -> list[nn.Module]:
    """The model's offload blocks, in model order, outermost only.

    Args:
        model: the model.
        blocks: modules, or class names; default: the classes in ``model._no_split_modules``
            (Hugging Face's list of modules that must stay on one device).
    """
    if blocks is not None and all(isinstance(b, nn.Module) for b in blocks):
        return list(blocks)  # type: ignore[arg-type]
    names = set(blocks) if blocks is not None else set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"fastlora: {type(model).__name__} declares no _no_split_modules; pass blocks=[...] "
            "(the repeated block modules, or their class names) for offload='blocks'"
        )
    found: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    if len(found) < 2:
        raise ValueError(
            f"fastlora: found {len(found)} block(s) of classes {sorted(names)} in {type(model).__name__}; "
            "block offload needs at least 2"
        )
    return found


@dataclass
class _Slot:
    """One parameter or buffer of a block: where it hangs and its pinned host copy."""

    owner: nn.Module
    name: str
    is_param: bool
    home: torch.Tensor

    def get(self) -> torch.Tensor:
        t = self.owner._parameters[self.name] if self.is_param else self.owner._buffers[self.name]
        return t.data if self.is_param else t

    def set(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = value
        else:
            self.owner._buffers[self.name] = value


@dataclass(frozen=True)
class _SavedRef:
    """A saved tensor that was a view of block ``block``'s slot ``slot``."""

    block: int
    slot: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class BlockOffloader:
    """Context manager streaming a model's blocks through ``device`` (see the module docstring).

    Args:
        model: a float model, on the CPU (its blocks stay there, pinned; the rest moves to ``device``
            while active and back after).
        device: the compute device (default: the current CUDA device, else the CPU, where the
            schedule runs with plain copies -- what the tests exercise).
        blocks: the blocks, as modules or class names (default ``_no_split_modules``).
        poison_evicted: fill each evicted device copy with NaN (a test aid: any use of a stale copy
            then shows up as NaN).

    Attributes:
        max_resident: the most blocks that were on the device at once (for tests and benchmarks).
        loads: how many block copies to the device were issued.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        blocks: Sequence[nn.Module] | Sequence[str] | None = None,
        *,
        poison_evicted: bool = False,
    ) -> None:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.blocks = find_blocks(model, blocks)
        quant = [n for n, m in model.named_modules() if is_bnb_4bit(m)]
        if quant:
            raise ValueError(
                f"fastlora: offload='blocks' is for float models (a 4-bit model such as this one, e.g. {quant[0]!r}, "
                "fits on the GPU: use offload=None or 'cpu')"
            )
        self.poison_evicted = poison_evicted
        self.max_resident = 0
        self.loads = 0
        self._cuda = self.device.type == "cuda"
        self._slots: list[list[_Slot]] = []
        self._rest: list[tuple[_Slot, torch.Tensor]] = []
        self._dev: dict[int, list[torch.Tensor]] = {}
        self._events: dict[int, Any] = {}
        self._ptr: dict[int, tuple[int, int]] = {}
        self._handles: list[Any] = []
        self._stack: contextlib.ExitStack | None = None
        self._copy_stream = None

    # -- residency ------------------------------------------------------------------------------
    def _collect(self) -> None:
        # Collected afresh on every entry: one offloader serves several passes (``passes=2``).
        self._slots, self._rest = [], []
        in_block: set[int] = set()
        seen: set[int] = set()
        for block in self.blocks:
            slots = []
            for module in block.modules():
                for name, p in module._parameters.items():
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        slots.append(_Slot(module, name, True, p.data))
                for name, b in module._buffers.items():
                    if b is not None and id(b) not in seen:
                        seen.add(id(b))
                        slots.append(_Slot(module, name, False, b))
                in_block.add(id(module))
            self._slots.append(slots)
        for module in self.model.modules():
            if id(module) in in_block:
                continue
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    self._rest.append((_Slot(module, name, True, p.data), p.data))
            for name, b in module._buffers.items():
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    self._rest.append((_Slot(module, name, False, b), b))

    def _pin(self) -> None:
        for slots in self._slots:
            for slot in slots:
                home = slot.get()
                if home.device.type != "cpu":
                    home = home.cpu()
                if self._cuda and not home.is_pinned():
                    home = home.pin_memory()
                slot.home = home
                slot.set(home)  # the unpinned original is freed when nothing else holds it

    def resident(self) -> list[int]:
        """Indices of the blocks now on the device (or being copied there)."""
        return sorted(self._dev)

    def load(self, i: int) -> None:
        """Start copying block ``i`` to the device (no-op if it is there or on its way)."""
        if i in self._dev or not 0 <= i < len(self.blocks):
            return
        slots = self._slots[i]
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            # Allocate on the compute stream: when the block is evicted its memory returns to that
            # stream's pool in stream order. The copy stream first waits for the compute stream, so
            # it never overwrites memory that queued kernels still read.
            dev = [torch.empty_like(s.home, device=self.device) for s in slots]
            self._copy_stream.wait_stream(compute)
            with torch.cuda.stream(self._copy_stream):
                for d, s in zip(dev, slots):
                    d.copy_(s.home, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            self._events[i] = event
        else:
            dev = [s.home.clone() for s in slots]
        for j, (d, s) in enumerate(zip(dev, slots)):
            s.set(d)
            self._ptr[d.untyped_storage().data_ptr()] = (i, j)
        self._dev[i] = dev
        self.loads += 1
        self.max_resident = max(self.max_resident, len(self._dev))

    def ensure(self, i: int) -> None:
        """Make block ``i`` usable by the next kernels of the current stream."""
        self.load(i)
        event = self._events.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def evict(self, i: int) -> None:
        """Drop block ``i``'s device copy; its parameters point at the pinned host copy again."""
        dev = self._dev.pop(i, None)
        if dev is None:
            return
        event = self._events.pop(i, None)
        if event is not None:  # evicted before use: let the copy finish before its memory is reused
            torch.cuda.current_stream(self.device).wait_event(event)
        for d, s in zip(dev, self._slots[i]):
            self._ptr.pop(d.untyped_storage().data_ptr(), None)
            s.set(s.home)
            if self.poison_evicted and d.is_floating_point():
                d.fill_(float("nan"))

    # -- hooks ---------------------------------------------------------------------------------------
    def _pre_forward(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            self.ensure(i)
            self.load(i + 1)  # prefetch while block i computes
            if i == 0 and torch.is_grad_enabled():
                # A leaf at the first block's input makes every later block's activations require
                # grad, so the backward hooks below fire for every block.
                if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                    if not args[0].requires_grad:
                        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
                elif (
                    isinstance(kwargs.get("hidden_states"), torch.Tensor) and not kwargs["hidden_states"].requires_grad
                ):
                    kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach().requires_grad_(True))
                    return args, kwargs
            return None

        return hook

    def _post_forward(self, i: int):
        last = len(self.blocks) - 1

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda grad: self._backward_start(i))
            if i not in (0, last):  # the last stays for backward, the first for the next batch
                self.evict(i)

        return hook

    def _backward_start(self, i: int) -> None:
        # The gradient w.r.t. block i's output is complete: every block after i has finished its
        # backward, and block i's is about to start.
        for j in [j for j in self._dev if j > i]:
            self.evict(j)
        self.ensure(i)
        if i - 1 > 0:
            self.load(i - 1)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device == self.device and self._ptr:
            ref = self._ptr.get(t.untyped_storage().data_ptr())
            if ref is not None:
                slot_tensor = self._dev[ref[0]][ref[1]]
                if slot_tensor.dtype == t.dtype:
                    return _SavedRef(ref[0], ref[1], t.size(), t.stride(), t.storage_offset())
        return t

    def _unpack(self, obj: Any) -> torch.Tensor:
        if not isinstance(obj, _SavedRef):
            return obj
        dev = self._dev.get(obj.block)
        if dev is None:
            raise RuntimeError(f"fastlora: block {obj.block} is not on the device during its backward (offload bug)")
        return dev[obj.slot].as_strided(obj.size, obj.stride, obj.offset)

    # -- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> BlockOffloader:
        self._collect()
        self._pin()
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        for slot, original in self._rest:
            slot.set(original.to(self.device))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_forward(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post_forward(i)))
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in list(self._dev):
            self.evict(i)
        for slot, original in self._rest:
            slot.set(original)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()


@dataclass(frozen=True)
class OffloadPlan:
    """The ``offload`` argument, resolved once per estimate.

    Attributes:
        host_sums: keep the sums (dense gradients or sketches) in host memory.
        offloader: the block offloader streaming the model, or None.
        device: where batches go (the offloader's compute device, else the model's device).
    """

    host_sums: bool
    offloader: BlockOffloader | None
    device: torch.device

    def sum_devices(self, targets: dict[str, nn.Module]) -> dict[str, torch.device]:
        """Where each target's sums live: host memory, the compute device of a streamed model (its
        layers' parameters sit in host memory between uses), or beside each layer."""
        if self.host_sums:
            return dict.fromkeys(targets, torch.device("cpu"))
        if self.offloader is not None:
            return dict.fromkeys(targets, self.offloader.device)
        return {name: module_device(m) for name, m in targets.items()}


def resolve_offload(
    offload: str | BlockOffloader | None,
    model: nn.Module,
    *,
    sketch: bool,
    device: torch.device | str | None = None,
    blocks: Sequence[nn.Module] | Sequence[str] | None = None,
) -> OffloadPlan:
    """Interpret ``offload`` for one estimate (see :func:`fastlora.estimate_gradient`).

    ``None``: sums beside the layers. ``"cpu"``: sums in host memory (dense: pinned, fed from a side
    stream; sketched: the small sketches are added into host memory). ``"blocks"``: stream the
    model's blocks through ``device``; the dense sums go to host memory (they would not fit beside a
    model that does not fit), sketches stay on ``device``. A :class:`BlockOffloader`: as
    ``"blocks"``, configured by the caller. ``device``/``blocks`` only mean something for
    ``"blocks"`` and are refused elsewhere rather than ignored.
    """
    if isinstance(offload, BlockOffloader):
        if offload.model is not model:
            raise ValueError("fastlora: offload= is a BlockOffloader of another model")
        if device is not None or blocks is not None:
            raise ValueError(
                "fastlora: device= and blocks= configure offload='blocks'; a BlockOffloader "
                "passed as offload= is configured already (give them to BlockOffloader(...))"
            )
        return OffloadPlan(host_sums=not sketch, offloader=offload, device=offload.device)
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"fastlora: offload must be None, 'cpu', 'blocks' or a BlockOffloader, got {offload!r}")
    if offload != "blocks" and (device is not None or blocks is not None):
        raise ValueError(
            f"fastlora: device= and blocks= are settings of offload='blocks', got offload={offload!r}; "
            "move the model itself to choose its device"
        )
    if offload == "blocks":
        off = BlockOffloader(model, device=device, blocks=blocks)
        return OffloadPlan(host_sums=not sketch, offloader=off, device=off.device)
    return OffloadPlan(host_sums=offload == "cpu", offloader=None, device=module_device(model))
