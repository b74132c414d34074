"""Which implementation runs the LoRA linear op: ``FASTLORA_BACKEND=auto|torch|triton``."""

from __future__ import annotations

import os

_VALID = ("auto", "torch", "triton")
_backend: str | None = None
_env_backend: str | None = None  # $FASTLORA_BACKEND as read by the first op call (see current())


def set_backend(name: str) -> None:
    """Select the LoRA linear implementation for this process.

    Args:
        name: ``"torch"`` (the pure-PyTorch reference op, runs anywhere), ``"triton"`` (the fused
            kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), or ``"auto"``
            (Triton for CUDA tensors when the kernels can be imported, else the reference).
            Overrides the ``FASTLORA_BACKEND`` environment variable.
    """
    global _backend
    if name not in _VALID:
        raise ValueError(f"fastlora: unknown backend {name!r}; choose one of {', '.join(_VALID)}")
    _backend = name


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend`, else ``$FASTLORA_BACKEND``, else ``"auto"``."""
    if _backend is not None:
        return _backend
    name = os.environ.get("FASTLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"fastlora: FASTLORA_BACKEND={name!r} is not one of {', '.join(_VALID)}")
    return name


def current() -> str:
    """The backend for an op call: :func:`get_backend` without re-reading the environment on every
    call (``$FASTLORA_BACKEND`` is read by the first call; :func:`set_backend` always takes effect)."""
    global _env_backend
    if _backend is not None:
        return _backend
    if _env_backend is None:
        _env_backend = get_backend()
    return _env_backend
