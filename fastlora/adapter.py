"""Saving and loading adapters in Hugging Face PEFT's LoRA format.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with tensors ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``. Per-module ranks and alphas that differ from the config's ``r``/``lora_alpha`` go
in ``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as ``(.*\\.)?<key>$``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ._dist import is_main_process, unwrap_ddp
from ._version import __version__
from .blocks import fuse_blocks
from .layer import LoraLinear
from .patching import inject, is_supported_linear, lora_layers, restore_base_offset

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FROZEN_KEY = "fastlora_frozen_rank"
CONFIG_DIGEST_KEY = "fastlora_config_sha256"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


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
    """Write the model's LoRA layers as a PEFT LoRA adapter into the folder ``path``, crash-safe.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads it and reproduces the patched
    model's outputs. Layers carrying a frozen LoRA-GA offset are written as the rank-2r delta to
    the original weights (see :meth:`LoraLinear.export`), so the adapter is plain LoRA.

    Only ``adapter_model.safetensors`` and ``adapter_config.json`` are written (as PEFT does); other
    files in the folder are left alone. Each is written to a temp file in the folder, fsynced and
    renamed over its target, weights first and config last, then the folder is fsynced: at every
    moment each file is whole, and :func:`load_adapter` reads either the old or the new adapter,
    whole (a crash between the two renames is rolled forward; see the README's reliability table).
    Temp files of an earlier save into the same folder that crashed are removed.

    Under ``torch.distributed`` only rank 0 writes; the other ranks return at once, without waiting
    for the files (call ``torch.distributed.barrier()`` after this if they read them). A
    ``DistributedDataParallel`` wrapper is unwrapped. With FSDP2 (``fully_shard``) the sharded
    A and B are all-gathered, a collective: **every rank must call** ``save_adapter``, not only rank 0
    (with DDP, calling it on rank 0 alone is fine).

    Args:
        model: a model patched by :func:`fastlora.patch` or :func:`fastlora.load_adapter`, possibly
            wrapped in DDP or sharded with FSDP2.
        path: the adapter folder (created if missing, with the umask's permissions; ``"."`` is the
            current folder).

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
    metadata = {"format": "pt", "fastlora_version": __version__}
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

    dest = _adapter_dir(path, "save_adapter")
    if not is_main_process():
        return dest
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"fastlora.save_adapter: {dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)  # mode 0o777 & ~umask, like any folder the user makes
    _remove_stale_temps(dest)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # The weights are renamed into place first: they carry the digest of the config they belong to,
    # so that a reader can tell a pair torn by a crash between the two renames (see _read_adapter).
    metadata[CONFIG_DIGEST_KEY] = hashlib.sha256(config_bytes).hexdigest()
    weights_tmp = _reserve_temp(dest, WEIGHTS_NAME)
    config_tmp: Path | None = None
    try:
        mode = stat.S_IMODE(weights_tmp.stat().st_mode)  # 0o666 & ~umask: safetensors writes 0o600 files
        save_file(tensors, str(weights_tmp), metadata=metadata)
        os.chmod(weights_tmp, mode)
        _fsync(weights_tmp)
        config_tmp = _reserve_temp(dest, CONFIG_NAME)
        with open(config_tmp, "wb") as f:
            f.write(config_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(weights_tmp, dest / WEIGHTS_NAME)
        weights_tmp = None  # from here on the fsynced config temp file is what a reader rolls forward to
        os.replace(config_tmp, dest / CONFIG_NAME)
        _fsync(dest)
    except BaseException:
        if weights_tmp is not None:  # nothing renamed yet: the old adapter is whole; drop the temp files
            for tmp in (weights_tmp, config_tmp):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
        raise
    return dest


def _adapter_dir(path: str | os.PathLike[str], fn: str) -> Path:
    if not os.fspath(path):
        raise ValueError(f'fastlora.{fn}: path is empty; pass the adapter folder (e.g. "out/adapter", or "." for here)')
    return Path(path)


# A save's temp files sit beside their targets: ".<target>.<pid>-<random>.fastlora-tmp".
_TEMP = re.compile(
    rf"^\.(?P<target>{re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)})\.(?P<pid>\d+)-[0-9a-f]+\.fastlora-tmp$"
)


def _reserve_temp(folder: Path, target: str) -> Path:
    """Create an empty temp file for ``target`` in ``folder`` (mode 0o666 & ~umask, as a plain open)."""
    while True:
        tmp = folder / f".{target}.{os.getpid()}-{secrets.token_hex(4)}.fastlora-tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (a save that raised) are stale by the time we save again
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process there; keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but is another user's
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Finish or clean up earlier saves into ``folder`` that crashed (their process is gone).

    A save killed between its two renames left the new weights beside the old config, and the new
    config in a temp file: that rename is completed first (roll forward), the rest is removed.
    """
    stale = [e for e in folder.iterdir() if (m := _TEMP.match(e.name)) and not _pid_alive(int(m["pid"]))]
    digest = _weights_config_digest(folder) if stale else None
    config = folder / CONFIG_NAME
    for entry in stale:
        if (
            digest is not None
            and entry.name.startswith(f".{CONFIG_NAME}.")
            and _sha256(entry) == digest
            and _sha256(config) != digest
        ):
            os.replace(entry, config)
            _fsync(folder)
        else:
            entry.unlink(missing_ok=True)


def _sha256(file: Path) -> str | None:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _weights_config_digest(folder: Path) -> str | None:
    """The config digest in ``folder``'s weights file, or None (no file, a PEFT one, unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get(CONFIG_DIGEST_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the file data itself was synced
    finally:
        os.close(fd)


def _parse_config(data: bytes, file: Path) -> dict:
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"fastlora.load_adapter: {file} is not valid JSON ({exc}); the file is damaged: save the adapter again "
            "or restore the file"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"fastlora.load_adapter: {file} holds a JSON {type(config).__name__}, not an adapter config")
    return config


def _check_config(config: dict, path: Path) -> dict:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"fastlora.load_adapter: {path} is a {config.get('peft_type')!r} adapter; fastlora loads plain LoRA only"
        )
    if config.get("use_dora"):
        raise ValueError(
            f"fastlora.load_adapter: {path} is a DoRA adapter (use_dora=true), which fastlora does not run"
        )
    return config


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors and its safetensors metadata (empty for ``adapter_model.bin``)."""
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"fastlora.load_adapter: {weights} is not a readable safetensors file ({exc}); it may be truncated "
                "(an interrupted copy or download): save or copy the adapter again"
            ) from None
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True), {}
        except Exception as exc:
            raise ValueError(f"fastlora.load_adapter: {legacy} cannot be read ({exc}); it may be damaged") from None
    raise FileNotFoundError(f"fastlora.load_adapter: no {WEIGHTS_NAME} (or adapter_model.bin) in {path}")


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """``(config, tensors, metadata)`` of one whole adapter: never the weights of one save with another's config.

    fastlora's weights carry the SHA-256 of the config saved with them. A save killed between its two
    renames leaves the new weights beside the old config and the new config in its fsynced temp file:
    that pair is rolled forward to the new adapter. A save running while we read can swap the files
    between our two reads: then we read again.
    """
    config_file = path / CONFIG_NAME
    for _ in range(3):
        if not config_file.is_file():
            raise FileNotFoundError(
                f"fastlora.load_adapter: {config_file} not found (is {path} a PEFT adapter directory?)"
            )
        _check_config(_parse_config(config_file.read_bytes(), config_file), path)  # before reading the weights
        state, metadata = _read_weights(path)
        data = config_file.read_bytes()
        digest = metadata.get(CONFIG_DIGEST_KEY)
        if digest is None or hashlib.sha256(data).hexdigest() == digest:
            return _check_config(_parse_config(data, config_file), path), state, metadata
        for entry in path.iterdir():
            m = _TEMP.match(entry.name)
            if m and m["target"] == CONFIG_NAME:
                try:
                    pending = entry.read_bytes()
                except FileNotFoundError:  # a running save renamed it in the meantime
                    continue
                if hashlib.sha256(pending).hexdigest() == digest:
                    return _check_config(_parse_config(pending, entry), path), state, metadata
    raise ValueError(
        f"fastlora.load_adapter: {path / WEIGHTS_NAME} and {config_file} come from different saves and the matching "
        "config is gone; save the adapter again"
    )


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


def _frozen_ranks(metadata: dict[str, str]) -> dict[str, int]:
    """``{module: rank of the frozen half}`` recorded by :func:`save_adapter` for LoRA-GA layers."""
    return {k: int(v) for k, v in json.loads(metadata.get(FROZEN_KEY, "{}")).items()}


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
    path = _adapter_dir(path, "load_adapter")
    config, state, metadata = _read_adapter(path)
    groups = _group(state, path)
    use_rslora = bool(config.get("use_rslora", False))
    alpha_default = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    existing = lora_layers(model)
    frozen = _frozen_ranks(metadata) if keep_frozen else {}
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
                restore_base_offset(layer)
            layer.lora_A.copy_(ab["A"][:r])
            layer.lora_B.copy_(ab["B"][:, :r])
            has_frozen = ab["A"].shape[0] > r
            layer.set_frozen_offset(ab["A"][r:] if has_frozen else None, -ab["B"][:, r:] if has_frozen else None)
    if not existing:
        fuse_blocks(model)
    return model
