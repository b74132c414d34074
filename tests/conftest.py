"""pytest hooks and fixtures: GPU tests skip without CUDA; an opt-in NaN-poisoning of torch.empty."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before
# any kernel is decorated, i.e. before fastlora.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so any output element a kernel
    forgets to write shows up as NaN (and NaN never passes ``helpers.relerr``)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
