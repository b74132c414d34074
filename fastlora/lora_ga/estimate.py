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

One loop (:func:`_run_pass`) runs every pass of every estimate; what it feeds is an accumulator
(:mod:`fastlora.lora_ga.accumulators`: dense sums beside the layers or in host memory;
:mod:`fastlora.lora_ga.sketch`: randomized sketches), and where the model and the sums live is an
:class:`~fastlora.lora_ga.offload.OffloadPlan`, resolved once per estimate.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..patching import TargetSpec
from .accumulators import DenseAccumulator, GradientAccumulator, HostAccumulator
from .offload import BlockOffloader, OffloadPlan, resolve_offload
from .sketch import (
    AUTO_ALIGNMENT_TOLERANCE,
    AUTO_ERROR_THRESHOLD,
    AUTO_MAX_PASSES,
    PROBES,
    RangeAccumulator,
    SketchAccumulator,
    SketchedGradient,
    leading_ranks,
    predicted_alignment,
    sketch_widths,
)
from .targets import accumulation_dtype, default_targets, target_shapes

__all__ = ["GradientEstimate", "LossFn", "estimate_gradient"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_WHO = "fastlora.estimate_gradient"


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

    def make_pre_hook(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if not x.is_floating_point():
                # Integer input reaching a linear layer is token ids fed to the wrong place, not a
                # dtype to convert the model to.
                raise TypeError(
                    f"{_WHO}: target layer {name!r} got {x.dtype} input; a linear layer needs float activations. "
                    "Token ids go to the model (a dict batch {'input_ids': ..., 'labels': ...} is run as "
                    "model(**batch)); a loss_fn must call the model on them, not a layer"
                )
            if torch.is_grad_enabled() and not x.requires_grad:
                return (x.detach().requires_grad_(True), *args[1:])
            return None

        return pre_hook

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
            handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
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


# -- batches -----------------------------------------------------------------------------------------------


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
                f"{_WHO}: the model returned no loss for a dict batch; include labels "
                "(e.g. batch['labels'] = batch['input_ids']) or pass loss_fn=lambda model, batch: ..."
            )
    else:
        raise TypeError(
            f"{_WHO}: batches of type {type(batch).__name__} need loss_fn=(model, batch) -> loss; "
            "dict batches are passed as model(**batch) and use its .loss"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"{_WHO}: the loss must be a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def _check_data(data: Any) -> None:
    """Refuse what is not an iterable of batches, before anything runs."""
    if data is None:
        raise ValueError(
            f"{_WHO}: data is None; pass an iterable of batches (a list, a DataLoader, a generator), "
            "e.g. data=[{'input_ids': ids, 'labels': ids}]"
        )
    if isinstance(data, Mapping):
        raise TypeError(
            f"{_WHO}: data is a single batch (a {type(data).__name__} with keys {sorted(map(str, data))[:4]}); "
            "pass an iterable of batches, e.g. data=[batch]"
        )
    if isinstance(data, (str, bytes, torch.Tensor)):
        raise TypeError(
            f"{_WHO}: data is one {type(data).__name__}; pass an iterable of batches, e.g. data=[batch] "
            "(a tensor's rows are not batches)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"{_WHO}: data must be an iterable of batches, got {type(data).__name__}")


def _batches(data: Iterable, iters: int) -> tuple[Iterable, int | None]:
    """At most ``iters`` batches of ``data``, and how many that will be (None when unknown: a generator)."""
    total = None
    if hasattr(data, "__len__"):
        with contextlib.suppress(TypeError):
            total = min(len(data), iters)  # type: ignore[arg-type]
    return itertools.islice(data, iters), total


def _progress(iterable: Iterable, total: int | None, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


# -- torch.distributed ------------------------------------------------------------------------------------


def _dist_world() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _collective(dist: Any, t: torch.Tensor, op: str) -> None:
    """``all_reduce`` (sum) or ``broadcast`` (from rank 0) of ``t`` in place; NCCL needs device
    tensors, so host tensors travel through the current GPU."""
    run = dist.all_reduce if op == "sum" else (lambda x: dist.broadcast(x, src=0))
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        run(tmp)
        t.copy_(tmp)
    else:
        run(t)


def _global_count(dist: Any, values: list[int]) -> list[int]:
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    _collective(dist, t, "sum")
    return t.tolist()


# -- the loop ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PassSettings:
    """What every pass of one estimate shares."""

    targets: Mapping[str, nn.Module]
    plan: OffloadPlan
    iters: int
    loss_fn: LossFn | None
    progress: bool


def _run_pass(
    model: nn.Module,
    data: Iterable[Any],
    accumulator: GradientAccumulator,
    run: _PassSettings,
    desc: str = "fastlora: estimating gradients",
) -> int:
    """One pass over ``data`` feeding ``accumulator``; its sums are then summed over ranks and
    checked. Returns the number of batches over all ranks."""
    targets, plan, loss_fn = run.targets, run.plan, run.loss_fn
    dist = _dist_world()
    batches, total = _batches(data, run.iters)
    count, bad_loss = 0, None
    finite: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_frozen(model))
        if plan.offloader is not None:
            stack.enter_context(plan.offloader)
        stack.enter_context(_capture(targets, accumulator))
        for batch in _progress(batches, total, run.progress and (dist is None or dist.get_rank() == 0), desc):
            loss = _batch_loss(model, _to_device(batch, plan.device), loss_fn)
            if not loss.requires_grad:
                raise ValueError(
                    f"{_WHO}: the loss does not depend on any target layer (no gradient flows into them); "
                    "check target_modules and loss_fn"
                )
            finite.append(torch.isfinite(loss.detach()))  # checked once at the end: no sync per batch
            loss.backward()
            del loss
            count += 1
        accumulator.flush()
    if finite and not bool(torch.stack([f.cpu() for f in finite]).all()):
        bad_loss = next(i for i, f in enumerate(finite) if not bool(f))
    flags = [count, int(bad_loss is not None), *(int(c > 0) for c in accumulator.updates.values())]
    total_batches, any_bad_loss, *reached = _global_count(dist, flags)
    if any_bad_loss:
        where = f"batch {bad_loss} (0-based)" if bad_loss is not None else "a batch of another rank"
        raise ValueError(
            f"{_WHO}: the loss of {where} is NaN/inf, which would make the estimate NaN or silently drop that "
            "batch; check it (e.g. labels that are all -100 give a 0/0 mean loss) or leave it out of data"
        )
    if total_batches == 0:
        raise ValueError(
            f"{_WHO}: data yielded no batch; LoRA-GA needs at least one. Check that the dataset is not empty "
            "(a DataLoader with drop_last=True yields nothing when the dataset is smaller than batch_size)"
        )
    missing = [n for n, f in zip(accumulator.updates, reached) if f == 0]
    if missing:
        raise ValueError(
            f"{_WHO}: no gradient reached {len(missing)} target layer(s), e.g. {missing[0]!r}; "
            "they are not used by the loss. Exclude them (exclude=[...])"
        )
    if dist is not None:
        for t in accumulator.state().values():
            _collective(dist, t, "sum")
    bad = accumulator.nonfinite_layers()
    if bad:
        more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
        raise ValueError(
            f"{_WHO}: the gradient of layer {bad[0]!r}{more} has NaN/inf entries over {total_batches} batches "
            "although every loss was finite: a gradient overflowed; check the scale of that layer's inputs, or "
            "estimate in fp32 (model.float())"
        )
    return total_batches


# -- the public entry -------------------------------------------------------------------------------------------


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
    passes: int | str = "auto",
    max_passes: int = AUTO_MAX_PASSES,
    seed: int = 0,
) -> GradientEstimate | SketchedGradient:
    """Average the full-weight gradient of every target linear layer over ``iters`` batches.

    Nothing of the model changes: parameters' ``requires_grad`` flags are restored afterwards and no
    ``.grad`` is created. The model's mode (train/eval) is left as it is.

    Args:
        model: any model; on a model patched by :func:`fastlora.patch` the targets are its
            :class:`~fastlora.LoraLinear` layers (gradient w.r.t. their base weight ``W0``), else the
            linear layers chosen by ``target_modules``/``exclude`` (as in :func:`fastlora.patch`).
        data: an iterable of batches (a list, a DataLoader, a generator). A dict batch is run as
            ``model(**batch).loss``; anything else needs ``loss_fn``. Tensors in a batch are moved to
            the model's device.
        iters: use at most this many batches.
        loss_fn: ``(model, batch) -> scalar loss``, used for every batch when given.
        offload: ``None`` (sums beside the layers), ``"cpu"`` (sums in host memory: dense ones pinned
            and updated asynchronously from a side CUDA stream, sketches added there), ``"blocks"``
            (the model's transformer blocks stay in pinned host memory and are streamed through
            ``device`` with prefetch, for float models larger than the GPU; dense sums go to host
            memory), or a configured :class:`~fastlora.lora_ga.BlockOffloader` of this model.
        progress: show a tqdm progress bar (rank 0 only).
        target_modules, exclude: which layers of an unpatched model (ignored for the default targets
            of a patched model unless given explicitly).
        targets: explicit ``{name: module}`` targets (overrides the two above).
        accumulator: a custom :class:`~fastlora.lora_ga.GradientAccumulator` (dense estimates only;
            its sums live where it puts them, so ``offload="cpu"`` is refused with it).
        device, blocks: settings of ``offload="blocks"``: the compute device (default: the current
            CUDA device, else the CPU) and the block modules or class names to stream (default: the
            classes in the model's ``_no_split_modules``).
        sketch: ``None`` (the dense estimate), or a randomized sketch of width ``k`` per layer (an int,
            or ``"auto"``: from each LoRA layer's rank) that yields only the top singular triplets,
            in ``O((out+in)·k)`` memory per layer (:mod:`fastlora.lora_ga.sketch`).
        passes: with ``sketch``: ``"auto"`` (default), or an int ``N``: exactly ``N`` passes over the
            data -- 1: the single-pass reconstruction; 2: one projection pass (a power iteration);
            each further pass one more subspace iteration. ``"auto"`` stops after the first pass
            when its a-posteriori error estimate says the leading triplets are reliable (gradients
            with structure), else runs projection passes until the first-step alignment predicted
            from the top-2r energy of all layers (``predicted_alignment``) rises by at most
            ``AUTO_ALIGNMENT_TOLERANCE`` (0.01) from one pass to the next (so at least 3 passes on
            a flat spectrum), at most ``max_passes``, and warns if it had not settled by then. More than one pass needs re-iterable ``data`` (a list, a DataLoader); with a
            one-shot iterator ``"auto"`` keeps the single pass and warns.
        max_passes: the most passes ``passes="auto"`` takes (default 4).
        seed: seed of the sketch's random test matrices (must be the same on every rank).

    Returns:
        With ``sketch``, a :class:`~fastlora.lora_ga.SketchedGradient` (``{name: (U, S, Vh)}``). Else
        a :class:`GradientEstimate`: fp32 ``[out, in]`` per layer (fp64 for an fp64 model), on the
        layers' devices (host memory with offload), summed over ranks and averaged over all ranks'
        batches when ``torch.distributed`` is initialised.

    Raises:
        ValueError: ``data`` is None or yields no batch, an unknown ``offload`` or a combination of
            arguments that would be ignored, a target got no gradient, or a gradient is NaN/inf
            (the message names the layer, and the batch when its loss was NaN).
        TypeError: ``data`` is a single batch rather than an iterable of batches; integer input
            reached a target layer.
    """
    _check_data(data)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"{_WHO}: iters must be a positive int, got {iters!r}")
    if passes != "auto" and (not isinstance(passes, int) or isinstance(passes, bool) or passes < 1):
        raise ValueError(f"{_WHO}: passes must be 'auto' or an int >= 1, got {passes!r}")
    if not isinstance(max_passes, int) or isinstance(max_passes, bool) or max_passes < 1:
        raise ValueError(f"{_WHO}: max_passes must be an int >= 1, got {max_passes!r}")
    if sketch is None and passes not in (1, "auto"):
        raise ValueError(f"{_WHO}: passes={passes} is for sketch=...; the dense estimate is exact in one pass")
    if sketch is not None and accumulator is not None:
        raise ValueError(f"{_WHO}: accumulator= and sketch= both choose what is accumulated; pass one of them")
    if accumulator is not None and offload == "cpu":
        raise ValueError(
            f"{_WHO}: offload='cpu' puts the sums in host memory, but accumulator= keeps its own; pass offload=None "
            "(or offload='blocks' to stream the model)"
        )
    if targets is None:
        targets = default_targets(model, target_modules, exclude)
    if not targets:
        raise ValueError(f"{_WHO}: no target layer (no linear layer matched target_modules)")
    ks = sketch_widths(sketch, targets) if sketch is not None else None
    if passes != "auto" and passes > 1 and iter(data) is data:
        raise ValueError(
            f"{_WHO}: passes={passes} goes over the data {passes} times; pass a re-iterable (a list, a DataLoader without "
            "shuffling), not an iterator or generator"
        )
    shapes = target_shapes(targets)
    dtype = accumulation_dtype(targets)
    plan = resolve_offload(offload, model, sketch=ks is not None, device=device, blocks=blocks)
    run = _PassSettings(targets, plan, iters, loss_fn, progress)
    if ks is None:
        own = accumulator is None
        if accumulator is None:
            accumulator = (
                HostAccumulator(shapes)
                if plan.host_sums
                else DenseAccumulator(shapes, plan.sum_devices(targets), dtype)
            )
        try:
            n = _run_pass(model, data, accumulator, run)
            return GradientEstimate(accumulator.result(n), n)
        finally:
            if own:
                accumulator.close()
    return _estimate_sketched(
        model, data, shapes, ks, passes=passes, max_passes=max_passes, seed=seed, dtype=dtype, run=run
    )


def _estimate_sketched(
    model: nn.Module,
    data: Iterable[Any],
    shapes: dict[str, tuple[int, int]],
    ks: dict[str, int],
    *,
    passes: int | str,
    max_passes: int,
    seed: int,
    dtype: torch.dtype,
    run: _PassSettings,
) -> SketchedGradient:
    """The sketched estimate: the single-pass sketch, then as many projection passes (subspace
    iterations) as ``passes`` asks for or, with ``"auto"``, as the first-step alignment predicted
    from the top-2r energy needs to settle (see the module docstring of :mod:`fastlora.lora_ga.sketch`)."""
    targets = run.targets
    devices = run.plan.sum_devices(targets)
    top = leading_ranks(targets, ks)
    auto = passes == "auto"
    first = SketchAccumulator(
        shapes, ks, seed=seed, devices=devices, dtype=dtype, reconstruct=auto or passes == 1, probes=PROBES, top=top,
    )  # fmt: skip
    n = _run_pass(model, data, first, run)
    factors = first.result(n)
    errors = first.errors
    dist = _dist_world()
    limit = max_passes if auto else int(passes)
    if auto:
        worst = max(errors, key=errors.get)
        # every rank computed the same errors from the same sums; agree on the decision all the same,
        # and stay single-pass everywhere if any rank's data cannot be read twice
        again, one_shot = _global_count(dist, [int(errors[worst] > AUTO_ERROR_THRESHOLD), int(iter(data) is data)])
        if again and one_shot and limit > 1:
            warnings.warn(
                f"{_WHO}: the single-pass sketch of layer {worst!r} has an estimated relative error of "
                f"{errors[worst]:.2f} (> {AUTO_ERROR_THRESHOLD}), so its leading singular vectors are unreliable "
                "and the LoRA-GA init may align worse with full fine-tuning than the exact one; more passes "
                "would fix it but data is a one-shot iterator: pass a list or a DataLoader",
                stacklevel=3,
            )
        if not again or one_shot:
            limit = 1
    sizes = dict(first.sizes)
    if limit == 1:
        return SketchedGradient(factors, n, 1, sizes, errors)
    bases, side = first.corange_bases(), "right"
    sizes = {name: (sizes[name][0], bases[name].shape[1]) for name in shapes}
    total = first.total_energy(n)
    del first, factors
    energies: list[float] = []
    alignments: list[float] = []
    taken, settled = 1, False
    while taken < limit:
        if dist is not None:  # every rank must multiply by the very same basis
            for P in bases.values():
                _collective(dist, P, "broadcast")
        acc = RangeAccumulator(shapes, bases, side=side, devices=devices, dtype=dtype, top=top)
        del bases
        where = f"up to {limit}" if auto else f"of {limit}"
        n2 = _run_pass(model, data, acc, run, desc=f"fastlora: estimating gradients (sketch pass {taken + 1} {where})")
        taken += 1
        if n2 != n:
            raise ValueError(
                f"{_WHO}: sketch pass {taken} saw {n2} batches, the first {n}; the data must yield the same "
                "batches on every pass (a DataLoader without shuffling and without drop_last randomness)"
            )
        factors = acc.result(n)
        energies.append(sum(acc.energies.values()))
        total = max(total, sum(acc.totals.values()))
        alignments = [predicted_alignment(e, total) for e in energies]
        settled = auto and len(alignments) >= 2 and alignments[-1] - alignments[-2] <= AUTO_ALIGNMENT_TOLERANCE
        # no vote across ranks: every rank decides from the same all-reduced sums (an extra collective here
        # made the 2-rank gloo test abort now and then: tests/test_lora_ga_sketch.py, distributed)
        if settled:
            break
        if taken < limit:
            bases, side = acc.next_bases(), "left" if side == "right" else "right"
        del acc
    if auto and not settled and len(alignments) >= 2:
        k = max(ks.values())
        warnings.warn(
            f"{_WHO}: passes='auto' stopped at max_passes={limit} before the sketch converged: the top-2r gradient "
            f"energy of all {len(shapes)} layers still rose by {(energies[-1] - energies[-2]) / energies[-1]:.1%} in "
            f"the last pass, which predicts a first-step alignment {alignments[-1] - alignments[-2]:.3f} higher "
            f"(tolerance {AUTO_ALIGNMENT_TOLERANCE}), so the LoRA-GA init may align less with full fine-tuning than "
            f"the exact one. Allow more passes (max_passes={limit + 2}, or passes={limit + 2}), widen the sketch "
            f"(sketch={2 * k}), or estimate exactly (sketch=None)",
            stacklevel=3,
        )
    return SketchedGradient(factors, n, taken, sizes, errors, energies, alignments)
