"""Injecting :class:`LoraLinear` layers into a model, and taking them out again."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import blocks
from .layer import LoraLinear, is_conv1d
from .quant import is_bnb_4bit

__all__ = [
    "TargetSpec",
    "inject",
    "lora_layers",
    "matches_target",
    "patch",
    "register_method",
    "register_model_hooks",
    "restore_base_offset",
    "select_targets",
    "unpatch",
]

TargetSpec = str | Sequence[str] | None

# name -> init(model, layers, **method_kwargs). Called once after injection, before returning.
_METHODS: dict[str, Callable[..., None]] = {}

# Called with the model after every injection and after unpatch. fastlora.trainer registers the Hugging
# Face save_pretrained hook here at package import: this module cannot import it (the trainer module
# needs the adapter module, which needs this one).
_AFTER_INJECT: list[Callable[[nn.Module], None]] = []
_AFTER_UNPATCH: list[Callable[[nn.Module], None]] = []


def register_model_hooks(after_inject: Callable[[nn.Module], None], after_unpatch: Callable[[nn.Module], None]) -> None:
    """Run ``after_inject(model)`` after every injection of LoRA layers and ``after_unpatch(model)`` after
    :func:`unpatch` (both once per call; registering the same pair twice is a no-op)."""
    if after_inject not in _AFTER_INJECT:
        _AFTER_INJECT.append(after_inject)
    if after_unpatch not in _AFTER_UNPATCH:
        _AFTER_UNPATCH.append(after_unpatch)


def register_method(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator registering an init method for ``patch(model, method=name)``.

    The function receives ``(model, layers, **method_kwargs)``, where ``layers`` maps module names
    to the freshly injected :class:`LoraLinear` layers, and initialises them in place.
    """

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        _METHODS[name] = fn
        return fn

    return deco


@register_method("lora")
def _init_lora(model: nn.Module, layers: dict[str, LoraLinear], **kwargs: object) -> None:
    """Standard LoRA: A Kaiming-uniform, B zero (done in ``LoraLinear.__init__``)."""
    if kwargs:
        raise TypeError(f"fastlora.patch(method='lora') got unexpected arguments: {sorted(kwargs)}")


def is_supported_linear(module: nn.Module) -> bool:
    """nn.Linear, bitsandbytes Linear4bit, or transformers Conv1D."""
    return isinstance(module, nn.Linear) or is_bnb_4bit(module) or is_conv1d(module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (LM head), which "all-linear" leaves alone, as PEFT does."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def matches_target(name: str, spec: str | Sequence[str]) -> bool:
    """Whether module ``name`` matches ``spec``: a regex over the full name, or a list of name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def select_targets(model: nn.Module, target_modules: TargetSpec, exclude: TargetSpec) -> list[str]:
    """Names of the modules of ``model`` that ``patch(target_modules=..., exclude=...)`` wraps, in model order."""
    if target_modules is None:
        target_modules = "all-linear"
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"fastlora: target_modules={target_modules!r} is not a valid regex ({exc})") from None
    heads = _output_head_names(model)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules == "all-linear":
            if not is_supported_linear(module) or name in heads:
                continue
        elif not matches_target(name, target_modules):
            continue
        if exclude is not None and matches_target(name, exclude):
            continue
        if not is_supported_linear(module):
            if isinstance(module, LoraLinear):
                raise RuntimeError(
                    f"fastlora: module {name!r} is already a LoraLinear: this model is patched; "
                    "call fastlora.unpatch(model) first"
                )
            if any(name.startswith(c + ".") for c in chosen) or not _is_leaf_target(module):
                continue
            raise TypeError(
                f"fastlora: target_modules matched {name!r}, a {type(module).__name__}, which LoRA cannot wrap; "
                "fastlora supports torch.nn.Linear, bitsandbytes.nn.Linear4bit and transformers Conv1D. "
                "Narrow target_modules or add it to exclude="
            )
        chosen.append(name)
    return chosen


def _is_leaf_target(module: nn.Module) -> bool:
    # A container whose name happens to match (e.g. "mlp") is skipped; only leaves are errors.
    return next(module.children(), None) is None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch(
    model: nn.Module,
    method: str = "lora",
    *,
    r: int = 8,
    alpha: float = 8,
    target_modules: TargetSpec = "all-linear",
    exclude: TargetSpec = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: torch.dtype | None = None,
    fuse_blocks: bool = True,
    **method_kwargs: object,
) -> nn.Module:
    """Replace matching linear layers of ``model`` in place with :class:`LoraLinear` layers.

    Every parameter of ``model`` is frozen; only the new ``lora_A``/``lora_B`` train.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, or your own).
        method: the init method: ``"lora"`` (A Kaiming-uniform, B zero) or ``"lora_ga"``
            (gradient-approximation init; needs ``data=``), or any name added with
            :func:`register_method`.
        r: LoRA rank (1 <= r <= min(in, out) of every targeted layer).
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        target_modules: ``"all-linear"`` (every nn.Linear / bnb Linear4bit / Conv1D except the
            output head), a list of module-name suffixes (PEFT's rule), or a regex matched against
            full module names.
        exclude: module names to leave alone, in the same forms as ``target_modules``.
        dropout: dropout probability on the LoRA branch's input.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        dtype: dtype of A and B (default fp32, as PEFT).
        fuse_blocks: run the projections of recognised decoder blocks as grouped ops: q/k/v of an
            attention as one op, a gated MLP (gate/up/down + SiLU or GELU-tanh) as one op (see
            :mod:`fastlora.blocks`). The layers stay per-projection ``LoraLinear`` modules either way
            (same parameters, same saved adapter); ``False`` runs every layer on its own.
        **method_kwargs: passed to the init method (e.g. ``data=``, ``iters=`` for LoRA-GA).

    Returns:
        ``model`` itself, patched.

    Raises:
        RuntimeError: the model is already patched.
        ValueError: nothing matched, an unknown method, or ``r`` does not fit a layer.
        TypeError: ``target_modules`` names a layer type LoRA cannot wrap.
    """
    if method not in _METHODS:
        raise ValueError(f"fastlora: unknown method {method!r}; available: {', '.join(sorted(_METHODS))}")
    if lora_layers(model):
        raise RuntimeError(
            "fastlora: this model is already patched; call fastlora.unpatch(model) before patching again"
        )
    names = select_targets(model, target_modules, exclude)
    if not names:
        linear = [n for n, m in model.named_modules() if is_supported_linear(m)]
        hint = ", ".join(linear[:8]) + (" ..." if len(linear) > 8 else "") if linear else "none"
        raise ValueError(
            f"fastlora: target_modules={target_modules!r} (exclude={exclude!r}) matched no module of "
            f"{type(model).__name__}; its linear layers are: {hint}"
        )
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    layers = inject(model, {name: (r, alpha) for name in names}, dropout=dropout, use_rslora=use_rslora, dtype=dtype)
    try:
        _METHODS[method](model, layers, **method_kwargs)
    except BaseException:
        unpatch(model)
        _restore_requires_grad(requires_grad)  # a failed patch leaves the model as it was
        raise
    if fuse_blocks:
        blocks.fuse_blocks(model)
    return model


def _restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def inject(
    model: nn.Module,
    specs: dict[str, tuple[int, float]],
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, LoraLinear]:
    """Wrap each named layer in a :class:`LoraLinear` of its own ``(r, alpha)``; freeze the rest.

    Every layer is built before the model is touched, so an error (a bad r) leaves it as it was,
    ``requires_grad`` flags included.
    """
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = {
            name: LoraLinear(
                model.get_submodule(name), r, alpha, dropout=dropout, use_rslora=use_rslora, dtype=dtype, name=name
            )
            for name, (r, alpha) in specs.items()
        }
    except BaseException:
        _restore_requires_grad(before)  # LoraLinear freezes its base layer as it is built
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for hook in _AFTER_INJECT:
        hook(model)
    return layers


def _merged_base(layer: LoraLinear, dequantize: bool, dtype: torch.dtype | None = None) -> nn.Module:
    base = layer.base_layer
    if layer.is_quantized:
        if not dequantize:
            raise ValueError(
                f"fastlora: layer {layer.name!r} has a 4-bit base weight; merging into it would re-quantise "
                "and lose the update. Pass dequantize=True to get an nn.Linear with the merged weight in the model's "
                "float dtype"
            )
        w = layer.dense_base_weight(torch.float32) + layer.delta_weight(torch.float32)
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=w.device)
        merged = merged.to(dtype or getattr(base, "compute_dtype", None) or torch.bfloat16)
        with torch.no_grad():
            merged.weight.copy_(w)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged
    with torch.no_grad():
        delta = layer.delta_weight(torch.float32)
        w = base.weight
        target = w.t() if is_conv1d(base) else w
        target.copy_((target.float() + delta).to(w.dtype))
    return base


def unpatch(model: nn.Module, merge: bool = False, *, dequantize: bool = False) -> nn.Module:
    """Put the original layers back in place of every :class:`LoraLinear`.

    Args:
        model: a patched model.
        merge: fold ``scaling·B·A`` (minus any frozen LoRA-GA offset term) into the base weight.
            Without ``merge``, a LoRA-GA offset that was subtracted from a float base weight in place
            is added back, so the original weight returns (up to rounding in its dtype).
        dequantize: needed to merge into a 4-bit base: the layer becomes an ``nn.Linear`` in the dtype
            of most of the model's other float parameters (embeddings, norms: the dtype activations
            flow in), so the merged model runs on the inputs it took before; in the 4-bit layer's
            ``compute_dtype`` (else bf16) for a model without float parameters.

    Returns:
        ``model``, with the base layers restored (their ``requires_grad`` stays False).
    """
    layers = lora_layers(model)
    if merge and not dequantize:
        quant = [n for n, layer in layers.items() if layer.is_quantized]
        if quant:  # check all first: a refused merge must not leave the model half unpatched
            _merged_base(layers[quant[0]], dequantize=False)
    blocks.unfuse_blocks(model)
    dtype = _float_param_dtype(model) if merge and dequantize else None
    for name, layer in layers.items():
        if not merge and layer.offset_in_base:
            restore_base_offset(layer)
        new = _merged_base(layer, dequantize, dtype) if merge else layer.base_layer
        _set_submodule(model, name, new)
    for hook in _AFTER_UNPATCH:
        hook(model)
    return model


def _float_param_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype most of the model's float parameters outside the LoRA layers have: the activations' dtype."""
    lora = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in lora:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


@torch.no_grad()
def restore_base_offset(layer: LoraLinear) -> None:
    """Undo LoRA-GA's in-place ``W0 − s·B0·A0`` (fp32 arithmetic; exact up to one rounding in W0's dtype)."""
    w = layer.base_layer.weight
    target = w.t() if is_conv1d(layer.base_layer) else w
    offset = (
        layer.lora_B0.to(target.device, torch.float32) @ layer.lora_A0.to(target.device, torch.float32)
    ) * layer.scaling
    target.copy_((target.to(torch.float32) + offset).to(target.dtype))
    layer.offset_in_base = False
