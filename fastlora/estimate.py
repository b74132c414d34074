"""Streaming estimation of the averaged full-weight gradient of linear layers (LoRA-GA's first step).

LoRA-GA (Wang, Yu, Li 2024, arXiv 2407.05000) initialises each adapter from the SVD of

    G = (1/N) · Σ_batches ∂L_b/∂W0       (out × in, one per target layer)

For ``y = x·W0ᵀ`` the weight gradient of one batch is ``dYᵀ·x`` summed over tokens, so G can be
accumulated from the activations the layer already has in its forward and backward: a forward
hook keeps a reference to ``x`` (the very tensor the op saves anyway, so no extra memory) and a
tensor hook on the output receives ``dY``. ``W0`` never gets ``requires_grad``, no ``.grad`` of any
weight is ever allocated, and the hooks see the same ``x`` and ``dY`` whatever the layer computes
with (the reference op, the fused Triton kernels, bitsandbytes NF4), so the estimate on a 4-bit
model is the gradient at the quantised weights -- the point LoRA then trains from.

Where the sum lives is an :class:`GradientAccumulator`: :class:`DenseAccumulator` keeps fp32
accumulators beside the layers, :class:`HostAccumulator` keeps them in pinned host memory and
updates them from a side CUDA stream. Other accumulators (a randomized sketch, say) plug in
through ``estimate_gradient(..., accumulator=...)``.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer import LoraLinear, base_features
from .offload import BlockOffloader
from .patching import TargetSpec, _select, lora_layers

__all__ = [
    "DenseAccumulator",
    "GradientAccumulator",
    "GradientEstimate",
    "HostAccumulator",
    "estimate_gradient",
    "outer_fp32",
]

if TYPE_CHECKING:
    from .sketch import SketchedGradient

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class GradientEstimate(Mapping[str, torch.Tensor]):
    """Averaged full-weight gradients, a read-only mapping ``module name -> fp32 [out, in]``.

    Attributes:
        num_batches: how many batches were averaged (summed over all ranks when distributed).
    """

    def __init__(self, grads: dict[str, torch.Tensor], num_batches: int) -> None:
        self._grads = dict(grads)
        self.num_batches = int(num_batches)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._grads[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._grads)

    def __len__(self) -> int:
        return len(self._grads)

    def __repr__(self) -> str:
        devices = sorted({str(g.device) for g in self._grads.values()})
        return f"GradientEstimate({len(self)} layers, {self.num_batches} batches, on {', '.join(devices) or '-'})"

    def to(self, device: torch.device | str) -> GradientEstimate:
        """A copy with every gradient on ``device``."""
        return GradientEstimate({k: v.to(device) for k, v in self._grads.items()}, self.num_batches)

    def save(self, path: str) -> None:
        """Write the estimate to a safetensors file (so an expensive estimate can be reused)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self._grads.items()}
        save_file(tensors, str(path), metadata={"num_batches": str(self.num_batches), "format": "fastlora-grad"})

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> GradientEstimate:
        """Read an estimate written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            grads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        return cls(grads, int(meta.get("num_batches", 1)))


# -- the per-batch outer product -------------------------------------------------------------------

_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on ``device``.

    It lets a bf16 product accumulate and come out in fp32 without upcasting the (large) operands.
    Newer PyTorch has it on CUDA only; probed once per (device type, dtype).
    """
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, device=device, dtype=dtype)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[key] = ok
    return _MM_OUT_DTYPE[key]


def outer_fp32(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dyᵀ·x`` in fp32 (``[N, K]`` from ``dy [M, N]``, ``x [M, K]``); added into ``out`` if given.

    fp32 and fp64 inputs multiply in their own precision; half-precision inputs are multiplied with
    fp32 output where the backend can (no rounding of the product to bf16, unlike ``.grad`` of a
    bf16 weight), else upcast.
    """
    if dy.dtype != x.dtype or not dy.is_floating_point():
        dtype = torch.promote_types(torch.promote_types(dy.dtype, x.dtype), torch.float32)
        dy, x = dy.to(dtype), x.to(dtype)
    if dy.dtype in (torch.float32, torch.float64):
        part = None
        if out is not None and out.dtype == dy.dtype:
            return out.addmm_(dy.t(), x)
        part = dy.t() @ x
    elif _mm_out_dtype_ok(dy.device, dy.dtype):
        part = torch.mm(dy.t(), x, out_dtype=torch.float32)
    else:
        part = dy.t().float() @ x.float()
    if out is None:
        return part.float() if part.dtype != torch.float64 else part
    return out.add_(part)


# -- accumulators -------------------------------------------------------------------------------------


class GradientAccumulator:
    """Where the per-batch contributions ``dYᵀ·x`` of every target layer are summed.

    Subclasses implement :meth:`add`; :meth:`state` returns the tensors to all-reduce (summed
    across ranks), and :meth:`result` turns the sums into what :class:`GradientEstimate` holds.
    ``add`` is called from autograd's backward thread: it must not block for long.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.shapes = dict(shapes)
        self.updates = dict.fromkeys(self.shapes, 0)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add ``dyᵀ·x`` (``x [M, in]``, ``dy [M, out]``) to layer ``name``'s sum."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every ``add`` so far is reflected in :meth:`state`."""

    def close(self) -> None:
        """Release threads / streams (called once, also on errors)."""

    def state(self) -> dict[str, torch.Tensor]:
        """The sums, by layer name (all-reduced in place across ranks when distributed)."""
        raise NotImplementedError

    def result(self, num_batches: int) -> dict[str, torch.Tensor]:
        """Averaged gradients ``sum / num_batches``, fp32 ``[out, in]``, by layer name."""
        out = {}
        for name, total in self.state().items():
            out[name] = total.div_(num_batches)
        return out


class DenseAccumulator(GradientAccumulator):
    """fp32 accumulators on ``device`` (default: each layer's own device), updated in place."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        devices: Mapping[str, torch.device] | torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(shapes)
        self._sums: dict[str, torch.Tensor] = {}
        for name, (n_out, n_in) in self.shapes.items():
            dev = devices.get(name) if isinstance(devices, Mapping) else devices
            self._sums[name] = torch.zeros(n_out, n_in, dtype=dtype, device=dev)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        acc = self._sums[name]
        if acc.device != x.device:
            acc.add_(outer_fp32(dy, x).to(acc.device))
        else:
            outer_fp32(dy, x, out=acc)
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return self._sums


class HostAccumulator(GradientAccumulator):
    """fp32 accumulators in host memory, so the device holds only a few layers' partials at a time.

    On CUDA each ``add`` computes the partial ``dYᵀ·x`` on the device (compute stream); a side stream
    waits for it, copies it into a pinned staging buffer and records an event; a host worker thread
    waits on that event and adds the buffer into the layer's host sum. The compute stream never
    waits for a copy. At most ``max_inflight`` partials exist at once (the backward thread blocks
    for a free staging buffer beyond that), which bounds device memory to that many layers'
    partials. Only the staging buffers are pinned: the sums themselves are ordinary memory (pinning
    26 GiB of sums for a 7B model would starve the host), and each layer's sum is created by its
    first partial (a copy instead of zero-fill plus add).

    ``workers`` host threads share the adds (each layer always goes to the same thread, so no sum is
    written by two threads); the rate of these adds -- host memory bandwidth, three fp32 passes per
    partial -- is what bounds this accumulator's speed. On an H100 host (16 cores) one worker thread
    added at 73 GB/s against 131 GB/s from the main thread, and 4 workers took a 4-layer 8B-shaped
    NF4 estimate from 0.258 to 0.198 s/batch (bench/NOTES.md), hence the default.

    On a CPU-only machine the partial is already in host memory: it goes straight to the workers,
    through the same queues and the same bound (so this logic is exercised on CPU too).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], *, max_inflight: int = 3, workers: int = 4) -> None:
        super().__init__(shapes)
        if max_inflight < 1 or workers < 1:
            raise ValueError("fastlora: max_inflight and workers must be >= 1")
        # Pinned memory needs a CUDA driver; on CPU-only builds plain memory is the host memory.
        self._pin = torch.cuda.is_available()
        self._sums: dict[str, torch.Tensor] = {}
        self._max_numel = max((o * i for o, i in self.shapes.values()), default=0)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._error: BaseException | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._owner = {name: i % workers for i, name in enumerate(self.shapes)}
        self._queues: list[queue.Queue[tuple | None]] = [queue.Queue() for _ in range(workers)]
        self._workers = [
            threading.Thread(target=self._run, args=(q,), name=f"fastlora-host-accumulator-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for w in self._workers:
            w.start()

    def _staging(self) -> torch.Tensor:
        # Created lazily (only CUDA needs them); never more than max_inflight exist.
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return torch.empty(self._max_numel, dtype=torch.float32, pin_memory=self._pin)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        self._raise_pending()
        self._slots.acquire()  # back-pressure: at most max_inflight partials alive
        try:
            part = outer_fp32(dy, x)
            if part.device.type == "cuda":
                compute = torch.cuda.current_stream(part.device)
                side = self._side_stream(part.device)
                stage = self._staging()
                buf = stage[: part.numel()].view(part.shape)
                side.wait_stream(compute)  # the partial is complete before it is copied
                with torch.cuda.stream(side):
                    buf.copy_(part, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(side)
                # The partial was allocated on the compute stream: keep the allocator from reusing
                # its memory until the side stream's copy has read it.
                part.record_stream(side)
                item = (name, buf, done, stage)
            else:
                item = (name, part, None, None)
            self._queues[self._owner[name]].put(item)
            self.updates[name] += 1
        except BaseException:
            self._slots.release()
            raise

    def _run(self, work: queue.Queue) -> None:
        while True:
            item = work.get()
            if item is None:
                work.task_done()
                return
            name, buf, done, stage = item
            try:
                if self._error is None:
                    if done is not None:
                        done.synchronize()
                    total = self._sums.get(name)
                    if total is None:
                        # the first partial becomes the sum (a staged one is copied out of its buffer)
                        self._sums[name] = buf if stage is None else buf.clone()
                    else:
                        total.add_(buf)
            except BaseException as exc:  # surfaced on the next add / flush
                self._error = exc
            finally:
                if stage is not None:
                    self._free.put(stage)
                self._slots.release()
                work.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise RuntimeError(f"fastlora: host gradient accumulation failed: {exc}") from exc

    def flush(self) -> None:
        for q in self._queues:
            q.join()
        self._raise_pending()

    def close(self) -> None:
        for q, w in zip(self._queues, self._workers):
            if w.is_alive():
                q.put(None)
                w.join()

    def state(self) -> dict[str, torch.Tensor]:
        for name, (n_out, n_in) in self.shapes.items():
            if name not in self._sums:  # a layer no batch reached
                self._sums[name] = torch.zeros(n_out, n_in, dtype=torch.float32)
        return {name: self._sums[name] for name in self.shapes}


# -- hooks ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture(targets: Mapping[str, nn.Module], accumulator: GradientAccumulator) -> Iterator[None]:
    """Hooks feeding ``dYᵀ·x`` of every target module into ``accumulator`` while active.

    Pre-hook: if the module's input does not require grad (the first layers of a model whose
    parameters are all frozen), it is replaced by a detached leaf that does. That is the cheapest
    way to make autograd produce ``dY`` at every target: the only extra work is ``dX`` at those
    first layers, and no parameter (W0 least of all) is touched.
    Forward hook: registers a hook on the output tensor that receives ``dY``; the input ``x`` lives
    in that hook's closure only, so it is released with the graph (also when a backward never
    comes, or a checkpointed forward is recomputed).
    """

    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if torch.is_grad_enabled() and not x.requires_grad and x.is_floating_point():
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def make_hook(name: str) -> Callable:
        def fwd_hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not (args and isinstance(args[0], torch.Tensor) and isinstance(y, torch.Tensor)):
                return
            if not y.requires_grad:
                return
            x = args[0].detach()

            def on_grad(dy: torch.Tensor) -> None:
                accumulator.add(name, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))

            y.register_hook(on_grad)

        return fwd_hook

    handles = []
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` off (restored after), so backward computes only what the
    hooks need: no ``dA``/``dB``, no ``.grad`` of anything."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# -- the driver ---------------------------------------------------------------------------------------------


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(
                "fastlora.estimate_gradient: the model returned no loss for a dict batch; include labels "
                "(e.g. batch['labels'] = batch['input_ids']) or pass loss_fn=lambda model, batch: ..."
            )
    else:
        raise TypeError(
            f"fastlora.estimate_gradient: batches of type {type(batch).__name__} need loss_fn=(model, batch) -> loss; "
            "dict batches are passed as model(**batch) and use its .loss"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("fastlora.estimate_gradient: the loss must be a scalar tensor")
    return loss.reshape(())


def _default_targets(model: nn.Module, target_modules: TargetSpec, exclude: TargetSpec) -> dict[str, nn.Module]:
    layers = lora_layers(model)
    if layers:
        if exclude is not None or target_modules not in (None, "all-linear"):
            from .patching import _matches

            if target_modules not in (None, "all-linear"):
                layers = {n: m for n, m in layers.items() if _matches(n, target_modules)}
            if exclude is not None:
                layers = {n: m for n, m in layers.items() if not _matches(n, exclude)}
        return dict(layers)
    names = _select(model, target_modules, exclude)
    return {name: model.get_submodule(name) for name in names}


def _module_device(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _weight_dtype(module: nn.Module) -> torch.dtype:
    base = module.base_layer if isinstance(module, LoraLinear) else module
    w = getattr(base, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


def _dist_world() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce_sum(dist: Any, t: torch.Tensor) -> None:
    """Sum ``t`` across ranks in place; NCCL needs device tensors, so host sums travel via the GPU."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        tmp = t.to(dev)
        dist.all_reduce(tmp)
        t.copy_(tmp)
    else:
        dist.all_reduce(t)


def _progress(iterable: Iterable, total: int | None, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="fastlora: estimating gradients", unit="batch", leave=False)


def _limit(data: Iterable, iters: int) -> tuple[Iterable, int | None]:
    total = None
    if hasattr(data, "__len__"):
        with contextlib.suppress(TypeError):
            total = min(len(data), iters)  # type: ignore[arg-type]
    return itertools.islice(data, iters), total if total is not None else iters


def estimate_gradient(
    model: nn.Module,
    data: Iterable[Any],
    *,
    iters: int = 64,
    loss_fn: LossFn | None = None,
    offload: str | BlockOffloader | None = None,
    progress: bool = True,
    target_modules: TargetSpec = "all-linear",
    exclude: TargetSpec = None,
    targets: Mapping[str, nn.Module] | None = None,
    accumulator: GradientAccumulator | None = None,
    device: torch.device | str | None = None,
    blocks: Sequence[nn.Module] | Sequence[str] | None = None,
    sketch: int | str | None = None,
    passes: int = 1,
) -> GradientEstimate | SketchedGradient:
    """Average the full-weight gradient of every target linear layer over ``iters`` batches.

    Nothing of the model changes: parameters' ``requires_grad`` flags are restored afterwards and no
    ``.grad`` is created. The model's mode (train/eval) is left as it is.

    Args:
        model: any model; on a model patched by :func:`fastlora.patch` the targets are its
            :class:`~fastlora.LoraLinear` layers (gradient w.r.t. their base weight ``W0``), else the
            linear layers chosen by ``target_modules``/``exclude`` (as in :func:`fastlora.patch`).
        data: an iterable of batches. A dict batch is run as ``model(**batch).loss``; anything else
            needs ``loss_fn``. Tensors in a batch are moved to the model's device.
        iters: use at most this many batches.
        loss_fn: ``(model, batch) -> scalar loss``, used for every batch when given.
        offload: ``None`` (accumulators beside the layers), ``"cpu"`` (fp32 accumulators in pinned host
            memory, updated asynchronously from a side CUDA stream), or ``"blocks"`` (the model's
            transformer blocks stay in pinned host memory and are streamed through ``device`` with
            prefetch, for float models larger than the GPU; implies ``"cpu"``), or a configured
            :class:`~fastlora.offload.BlockOffloader` of this model.
        progress: show a tqdm progress bar (rank 0 only).
        target_modules, exclude: which layers of an unpatched model (ignored for the default targets
            of a patched model unless given explicitly).
        targets: explicit ``{name: module}`` targets (overrides the two above).
        accumulator: a custom :class:`GradientAccumulator` (e.g. a sketch); overrides ``offload``'s
            choice of accumulator.
        device: the compute device of ``offload="blocks"`` (default: the current CUDA device, else CPU).
        blocks: for ``offload="blocks"``: the block modules (or their class names) to stream; default
            the classes in the model's ``_no_split_modules``.
        sketch: ``None`` (the dense estimate), or a randomized sketch of width ``k`` per layer (an int,
            or ``"auto"``: from each LoRA layer's rank) that yields only the top singular triplets,
            in ``O((out+in)·k)`` memory per layer: see :func:`fastlora.sketch.estimate_sketched`.
        passes: with ``sketch``: 1, or 2 for a second pass over the (re-iterable) data.

    Returns:
        With ``sketch``, a :class:`fastlora.sketch.SketchedGradient` (``{name: (U, S, Vh)}``). Else
        a :class:`GradientEstimate`: fp32 ``[out, in]`` per layer (fp64 for an fp64 model), on the layers' devices (host memory
        with offload), summed over ranks and averaged over all ranks' batches when
        ``torch.distributed`` is initialised.

    Raises:
        ValueError: ``data`` yields no batch, an unknown ``offload``, a target got no gradient, or a
            gradient is NaN/inf (the message names the layer).
    """
    if sketch is not None:
        from .sketch import estimate_sketched

        return estimate_sketched(
            model, data, sketch=sketch, passes=passes, iters=iters, loss_fn=loss_fn, offload=offload,
            progress=progress, target_modules=target_modules, exclude=exclude, targets=targets, device=device,
            blocks=blocks,
        )  # fmt: skip
    if passes != 1:
        raise ValueError("fastlora.estimate_gradient: passes=2 is for sketch=...; the dense estimate is exact")
    if not (offload in (None, "cpu", "blocks") or isinstance(offload, BlockOffloader)):
        raise ValueError(f"fastlora.estimate_gradient: offload must be None, 'cpu' or 'blocks', got {offload!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"fastlora.estimate_gradient: iters must be a positive int, got {iters!r}")
    if targets is None:
        targets = _default_targets(model, target_modules, exclude)
    if not targets:
        raise ValueError("fastlora.estimate_gradient: no target layer (no linear layer matched target_modules)")
    shapes = {}
    for name, module in targets.items():
        n_in, n_out = base_features(module.base_layer if isinstance(module, LoraLinear) else module)
        shapes[name] = (n_out, n_in)

    offloader = offload if isinstance(offload, BlockOffloader) else None
    if offload == "blocks":
        offloader = BlockOffloader(model, device=device, blocks=blocks)
    compute_device = offloader.device if offloader is not None else _module_device(model)
    own_accumulator = accumulator is None
    if accumulator is None:
        if offload == "cpu" or offloader is not None:
            accumulator = HostAccumulator(shapes)
        else:
            # An fp64 model (the exactness tests) is accumulated in fp64; everything else in fp32.
            w_dtypes = {_weight_dtype(m) for m in targets.values()}
            acc_dtype = torch.float64 if w_dtypes == {torch.float64} else torch.float32
            devices = {n: _module_device(m) for n, m in targets.items()}
            accumulator = DenseAccumulator(shapes, devices, dtype=acc_dtype)

    dist = _dist_world()
    rank = dist.get_rank() if dist is not None else 0
    batches, total = _limit(data, iters)
    count = 0
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen(model))
            if offloader is not None:
                stack.enter_context(offloader)
            stack.enter_context(_capture(targets, accumulator))
            for batch in _progress(batches, total, progress and rank == 0):
                loss = _batch_loss(model, _to_device(batch, compute_device), loss_fn)
                if not loss.requires_grad:
                    raise ValueError(
                        "fastlora.estimate_gradient: the loss does not depend on any target layer "
                        "(no gradient flows into them); check target_modules and loss_fn"
                    )
                loss.backward()
                del loss
                count += 1
            accumulator.flush()
        total_batches = count
        if dist is not None:
            n = torch.tensor([count], dtype=torch.int64)
            _all_reduce_sum(dist, n)
            total_batches = int(n.item())
        if total_batches == 0:
            raise ValueError("fastlora.estimate_gradient: data yielded no batch; LoRA-GA needs at least one")
        missing = [n for n, c in accumulator.updates.items() if c == 0]
        if dist is not None:
            flags = torch.tensor([c > 0 for c in accumulator.updates.values()], dtype=torch.int64)
            _all_reduce_sum(dist, flags)
            missing = [n for n, f in zip(accumulator.updates, flags.tolist()) if f == 0]
        if missing:
            raise ValueError(
                f"fastlora.estimate_gradient: no gradient reached {len(missing)} target layer(s), e.g. {missing[0]!r}; "
                "they are not used by the loss. Exclude them (exclude=[...])"
            )
        if dist is not None:
            for t in accumulator.state().values():
                _all_reduce_sum(dist, t)
        grads = accumulator.result(total_batches)
    finally:
        if own_accumulator:
            accumulator.close()
    bad = [n for n, g in grads.items() if isinstance(g, torch.Tensor) and not bool(torch.isfinite(g).all())]
    if bad:
        more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
        raise ValueError(
            f"fastlora.estimate_gradient: the gradient of layer {bad[0]!r}{more} has NaN/inf entries "
            f"(over {total_batches} batches); check the loss and the data (a NaN loss makes every layer's "
            "gradient NaN), or the scale of that layer's inputs"
        )
    return GradientEstimate(grads, total_batches)
