"""The ``lora_ga`` init method of :func:`fastlora.patch`, registered when :mod:`fastlora.lora_ga` is imported.

The last stage of the flow: estimate the gradient (:mod:`~fastlora.lora_ga.estimate`, dense or
sketched), then initialise every layer from it (:mod:`~fastlora.lora_ga.init`). Every factor is
computed before any weight changes, so an error leaves the model as :func:`fastlora.patch` made it
(and ``patch`` then unpatches it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..layer import LoraLinear
from ..patching import register_method
from .estimate import LossFn, estimate_gradient
from .init import (
    DIRECTIONS,
    OFFSETS,
    SCALES,
    SVD_METHODS,
    apply_offset,
    factors_from_singular,
    lora_ga_factors,
    offset_in_base,
)
from .sketch import AUTO_MAX_PASSES

__all__ = ["init_lora_ga"]


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"fastlora.patch(method='lora_ga'): {name} must be one of {', '.join(choices)}; got {value!r}")


def _compute_device(layer: LoraLinear, G: torch.Tensor) -> torch.device:
    # The SVD runs where it is fast: the layer's GPU, else the estimate's GPU, else any GPU.
    if layer.lora_A.is_cuda:
        return layer.lora_A.device
    if G.is_cuda:
        return G.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@register_method("lora_ga")
def init_lora_ga(
    model: nn.Module,
    layers: dict[str, LoraLinear],
    *,
    data: Iterable[Any] | None = None,
    iters: int = 64,
    loss_fn: LossFn | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    grads: Mapping[str, Any] | None = None,
    offload: str | None = None,
    svd: str = "auto",
    offset: str = "auto",
    seed: int = 0,
    progress: bool = True,
    sketch: int | str | None = None,
    passes: int | str = "auto",
    max_passes: int = AUTO_MAX_PASSES,
) -> None:
    """The ``method="lora_ga"`` init of :func:`fastlora.patch` (keyword arguments of ``patch``).

    Args:
        model: the freshly patched model (its LoRA layers start equal to the base).
        layers: the injected layers, by name.
        data: batches for :func:`fastlora.estimate_gradient` (needed unless ``grads`` is given).
        iters: batches to average.
        loss_fn: ``(model, batch) -> loss`` for non-dict batches.
        direction: ``"ArB2r"`` (default), ``"A2rBr"``, ``"ArBr"`` or ``"random"``.
        scale: ``"stable"`` (default), ``"gd"``, ``"unit"`` or ``"weightS"``.
        stable_gamma: gamma of the stable scale (default 16).
        grads: a precomputed estimate (``{name: [out, in]}``, e.g. a :class:`GradientEstimate`, or a
            sketched one, ``estimate_gradient(..., sketch=k)``) for every target layer; then ``data`` is
            not used.
        offload: passed to :func:`fastlora.estimate_gradient` (``None``, ``"cpu"``, ``"blocks"``).
        svd: ``"auto"`` (randomized, q = 4r and 4 power iterations as the reference, where that is
            smaller than the matrix), ``"exact"`` or ``"randomized"``.
        offset: ``"auto"`` (subtract ``s·B·A`` from an fp32/fp64 W0 in place, in fp32; keep it as an
            exact frozen term for a bf16/fp16 or 4-bit W0, which in-place rounding would change),
            ``"base"`` (always in place; refused for 4-bit) or ``"frozen"`` (always the frozen term).
        seed: seed of the randomized SVD and of ``direction="random"`` (the same on every rank).
        progress: progress bars.
        sketch: ``None`` (dense estimate), or estimate only the top singular vectors from randomized
            sketches of width ``k`` (an int >= 2r, or ``"auto"``: ``auto_sketch_size(r)``), in
            ``O((out+in)·k)`` memory per layer instead of ``out·in`` (:mod:`fastlora.lora_ga.sketch`).
        passes, max_passes: with ``sketch``: ``"auto"`` (one pass where the first pass's error
            estimate trusts it, else passes until the top-2r energy settles, at most ``max_passes``)
            or an int (exactly that many passes); see :func:`fastlora.estimate_gradient`.
    """
    _check_choice("direction", direction, DIRECTIONS)
    _check_choice("scale", scale, SCALES)
    _check_choice("svd", svd, SVD_METHODS)
    _check_choice("offset", offset, OFFSETS)
    if stable_gamma <= 0:
        raise ValueError(f"fastlora.patch(method='lora_ga'): stable_gamma must be > 0, got {stable_gamma}")
    for name, layer in layers.items():
        if 2 * layer.r > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"fastlora.patch(method='lora_ga'): r={layer.r} is too large for layer {name!r} "
                f"({layer.in_features}->{layer.out_features}); LoRA-GA uses 2r singular vectors, so r <= "
                f"{min(layer.in_features, layer.out_features) // 2}"
            )
        if isinstance(sketch, int) and not isinstance(sketch, bool) and sketch < 2 * layer.r:
            raise ValueError(
                f"fastlora.patch(method='lora_ga'): sketch={sketch} is narrower than the top 2r = {2 * layer.r} "
                f"singular vectors LoRA-GA needs (layer {name!r}); use sketch='auto' or an int >= 4r"
            )
        if offset == "base" and layer.is_quantized:
            raise ValueError(
                f"fastlora.patch(method='lora_ga'): offset='base' would re-quantise the 4-bit weight of {name!r} "
                "(lossy); use offset='auto' or 'frozen'"
            )
    if grads is None:
        if data is None:
            raise ValueError(
                "fastlora.patch(method='lora_ga') needs data= (an iterable of batches for the gradient estimate) "
                "or grads= (a precomputed fastlora.estimate_gradient result)"
            )
        grads = estimate_gradient(
            model, data, iters=iters, loss_fn=loss_fn, offload=offload, progress=progress, targets=layers,
            sketch=sketch, passes=passes, max_passes=max_passes, seed=seed,
        )  # fmt: skip
    else:
        missing = [n for n in layers if n not in grads]
        if missing:
            raise ValueError(
                f"fastlora.patch(method='lora_ga'): grads has no entry for {len(missing)} target layer(s), e.g. {missing[0]!r}"
            )
        for name, layer in layers.items():
            if tuple(grads[name].shape) != (layer.out_features, layer.in_features):
                raise ValueError(
                    f"fastlora.patch(method='lora_ga'): grads[{name!r}] has shape {tuple(grads[name].shape)}, "
                    f"expected [out, in] = [{layer.out_features}, {layer.in_features}]"
                )

    # Every factor is computed before any weight changes: an error (or Ctrl-C) leaves the model as
    # patch() made it, and patch() then unpatches it cleanly.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    items = list(layers.items())
    if progress:
        try:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="fastlora: LoRA-GA init", unit="layer", leave=False)
        except ImportError:
            pass
    for i, (name, layer) in enumerate(items):
        G = grads[name]
        dev = _compute_device(layer, G)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed * 1_000_003 + i)  # per layer, identical on every rank
        weight = layer.dense_base_weight(torch.float32).to(dev) if scale == "weightS" else None
        if isinstance(G, torch.Tensor):
            A, B = lora_ga_factors(
                G.to(dev, torch.float32), layer.r, scaling=layer.scaling, direction=direction, scale=scale,
                stable_gamma=stable_gamma, svd=svd, weight=weight, generator=gen,
            )  # fmt: skip
        else:  # a sketched estimate's factors (a LowRankGradient): no SVD of G needed
            U, Vh = G.U[:, : 2 * layer.r].to(dev, torch.float32), G.Vh[: 2 * layer.r].to(dev, torch.float32)
            A, B = factors_from_singular(
                U, Vh, layer.r, scaling=layer.scaling, direction=direction, scale=scale,
                stable_gamma=stable_gamma, svd=svd, weight=weight, generator=gen,
            )  # fmt: skip
        factors[name] = (A.to(layer.lora_A.device), B.to(layer.lora_B.device))
    for name, layer in layers.items():
        A, B = factors[name]
        apply_offset(layer, A, B, offset_in_base(layer, offset))
