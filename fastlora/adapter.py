"""Saving and loading adapters in Hugging Face PEFT's LoRA format.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with tensors ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``. Per-module ranks and alphas that differ from the config's ``r``/``lora_alpha`` go
in ``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as ``(.*\\.)?<key>$``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ._dist import is_main_process, unwrap_ddp
from .layer import LoraLinear
from .patching import inject, is_supported_linear, lora_layers

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FROZEN_KEY = "fastlora_frozen_rank"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _version() -> str:
    from . import __version__

    return __version__


def _pattern_value(name: str, pattern: dict[str, float], default: float) -> float:
    """PEFT's lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the model's LoRA layers as a PEFT LoRA adapter directory, atomically.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads it and reproduces the patched
    model's outputs. Layers carrying a frozen LoRA-GA offset are written as the rank-2r delta to
    the original weights (see :meth:`LoraLinear.export`), so the adapter is plain LoRA.

    The files are written to a temporary directory beside ``path`` and renamed into place, so a
    crash never leaves a half-written adapter; an existing adapter at ``path`` is replaced.

    Under ``torch.distributed`` only rank 0 writes; the other ranks return at once, without waiting
    for the files (call ``torch.distributed.barrier()`` after this if they read them). A
    ``DistributedDataParallel`` wrapper is unwrapped. With FSDP2 (``fully_shard``) the sharded
    A and B are all-gathered, a collective: **every rank must call** ``save_adapter``, not only rank 0
    (with DDP, calling it on rank 0 alone is fine).

    Args:
        model: a model patched by :func:`fastlora.patch` or :func:`fastlora.load_adapter`, possibly
            wrapped in DDP or sharded with FSDP2.
        path: the adapter directory to create or replace.

    Returns:
        The adapter directory (on every rank).
    """
    from safetensors.torch import save_file

    model = unwrap_ddp(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("fastlora.save_adapter: the model has no LoRA layers; call fastlora.patch(model, ...) first")
    exported = {name: layer.export() for name, layer in layers.items()}
    first = next(iter(layers.values()))
    if any(layer.use_rslora != first.use_rslora for layer in layers.values()):
        raise ValueError("fastlora.save_adapter: PEFT needs one use_rslora for the whole adapter; the layers disagree")
    r_default = Counter(A.shape[0] for A, _, _ in exported.values()).most_common(1)[0][0]
    alpha_default = Counter(alpha for _, _, alpha in exported.values()).most_common(1)[0][0]
    rank_pattern = {n: A.shape[0] for n, (A, _, _) in exported.items() if A.shape[0] != r_default}
    alpha_pattern = {n: alpha for n, (_, _, alpha) in exported.items() if alpha != alpha_default}
    dropouts = {layer.dropout for layer in layers.values()}
    tensors = {}
    for name, (A, B, _) in exported.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
    # LoRA-GA layers export [A; A0] and [B, -B0]: record the frozen half's rank so that load_adapter
    # can resume training with A0, B0 frozen again. In the safetensors metadata, which PEFT ignores
    # (an unknown adapter_config.json key would make it warn).
    frozen = {n: int(layer.lora_A0.shape[0]) for n, layer in layers.items() if layer.lora_A0 is not None}
    metadata = {"format": "pt", "fastlora_version": _version()}
    if frozen:
        metadata[FROZEN_KEY] = json.dumps(frozen, sort_keys=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _base_model_name(model),
        "r": int(r_default),
        "lora_alpha": float(alpha_default),
        "lora_dropout": max(dropouts),
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": bool(first.use_rslora),
        "fan_in_fan_out": any(type(layer.base_layer).__name__ == "Conv1D" for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }

    dest = Path(path)
    if not is_main_process():
        return dest
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"fastlora.save_adapter: {dest} exists and is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "adapter")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"fastlora.load_adapter: {config_file} not found (is {path} a PEFT adapter directory?)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"fastlora.load_adapter: {path} is a {config.get('peft_type')!r} adapter; fastlora loads plain LoRA only"
        )
    if config.get("use_dora"):
        raise ValueError(
            f"fastlora.load_adapter: {path} is a DoRA adapter (use_dora=true), which fastlora does not run"
        )
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"fastlora.load_adapter: no {WEIGHTS_NAME} (or adapter_model.bin) in {path}")
    return config, state


def _group(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"fastlora.load_adapter: {path} holds {key!r}, which is not a LoRA A/B weight "
                "(modules_to_save, embeddings and biases are not supported)"
            )
        groups.setdefault(m["module"], {})[m["which"]] = tensor
    for name, ab in groups.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"fastlora.load_adapter: {path} has lora_{''.join(ab)} but not both A and B for {name!r}")
    return groups


def _frozen_ranks(path: Path) -> dict[str, int]:
    """``{module: rank of the frozen half}`` recorded by :func:`save_adapter` for LoRA-GA layers."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: int(v) for k, v in json.loads(meta.get(FROZEN_KEY, "{}")).items()}


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, keep_frozen: bool = True
) -> nn.Module:
    """Load a PEFT LoRA adapter (written by fastlora or by PEFT) into ``model``.

    An unpatched model is patched with one :class:`LoraLinear` per adapter module, each with its
    own rank and alpha (``rank_pattern``/``alpha_pattern`` and rsLoRA honoured). A model already
    patched on exactly those modules with those ranks has its A and B overwritten.

    Every check runs before the model is touched: on any error the model is unchanged.

    Args:
        model: the base model the adapter was trained on (or that model, patched).
        path: the adapter directory.
        dtype: dtype for A and B (default fp32).
        keep_frozen: for an adapter saved from a LoRA-GA model (rank ``2r`` = trainable ``[A; A0]`` and
            ``[B, −B0]``), rebuild the layers as rank ``r`` with ``A0``, ``B0`` frozen again, so that
            training resumes exactly where it stopped (same function, same trainable parameters).
            ``False`` loads the plain rank-``2r`` LoRA, as PEFT does.

    Returns:
        ``model``, patched, with the adapter's weights.
    """
    path = Path(path)
    config, state = _read_adapter(path)
    groups = _group(state, path)
    use_rslora = bool(config.get("use_rslora", False))
    alpha_default = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    existing = lora_layers(model)
    frozen = _frozen_ranks(path) if keep_frozen else {}
    specs: dict[str, tuple[int, float]] = {}
    for name, ab in groups.items():
        A, B = ab["A"], ab["B"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"fastlora.load_adapter: the adapter targets {name!r}, which this model does not have"
            ) from None
        if isinstance(module, LoraLinear):
            in_f, out_f = module.in_features, module.out_features
        elif is_supported_linear(module):
            from .layer import base_features

            in_f, out_f = base_features(module)
        else:
            raise ValueError(f"fastlora.load_adapter: {name!r} is a {type(module).__name__}, not a linear layer")
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape != (out_f, r):
            raise ValueError(
                f"fastlora.load_adapter: shapes do not fit {name!r} ({in_f}->{out_f}): lora_A {tuple(A.shape)}, "
                f"lora_B {tuple(B.shape)}; expected [r, {in_f}] and [{out_f}, r]. Was it trained on another model?"
            )
        alpha = _pattern_value(name, alpha_pattern, alpha_default)
        r0 = frozen.get(name, 0)
        if 0 < r0 < r:  # trainable rank r - r0, same scaling: alpha·(r-r0)/r (rsLoRA: ·sqrt((r-r0)/r))
            ratio = (r - r0) / r
            alpha, r = alpha * (math.sqrt(ratio) if use_rslora else ratio), r - r0
        specs[name] = (r, alpha)
    if existing:
        if set(existing) != set(specs) or any(existing[n].r != specs[n][0] for n in specs):
            raise ValueError(
                "fastlora.load_adapter: the model is already patched on other modules or ranks than the adapter; "
                "call fastlora.unpatch(model) first"
            )
        layers = existing
        for name, (_, alpha) in specs.items():
            layer = layers[name]
            layer.lora_alpha, layer.use_rslora = alpha, use_rslora
            layer.scaling = alpha / (layer.r**0.5 if use_rslora else layer.r)
    else:
        layers = inject(
            model, specs, dropout=float(config.get("lora_dropout", 0.0)), use_rslora=use_rslora, dtype=dtype
        )
    with torch.no_grad():
        for name, ab in groups.items():
            layer, r = layers[name], specs[name][0]
            if layer.offset_in_base:  # a LoRA-GA offset subtracted in place: give the base back first
                from .patching import _restore_base_offset

                _restore_base_offset(layer)
            layer.lora_A.copy_(ab["A"][:r])
            layer.lora_B.copy_(ab["B"][:, :r])
            has_frozen = ab["A"].shape[0] > r
            layer.set_frozen_offset(ab["A"][r:] if has_frozen else None, -ab["B"][:, r:] if has_frozen else None)
    if not existing:
        from .blocks import fuse_blocks

        fuse_blocks(model)
    return model
