"""Packaging contracts: light import, the kernels' install name, the demo."""

from __future__ import annotations

import subprocess
import sys

import fastlora


def test_import_needs_only_torch():
    """`import fastlora` and the reference path work with bitsandbytes/transformers/peft/triton absent."""
    code = (
        "import sys\n"
        "for m in ('bitsandbytes', 'transformers', 'peft', 'triton'): sys.modules[m] = None\n"
        "import torch, fastlora\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))\n"
        "fastlora.patch(m, r=2, target_modules=['0', '2'])\n"
        "m(torch.randn(3, 16)).sum().backward()\n"
        "print(len(fastlora.lora_layers(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_kernels_install_as_fastlora_kernels():
    """Our kernels/ folder is reachable as fastlora.kernels and never as a top-level `kernels`."""
    import importlib.util
    from pathlib import Path

    ours = Path(importlib.util.find_spec("fastlora.kernels").origin).parent.resolve()
    assert ours.name == "kernels"
    top = importlib.util.find_spec("kernels")
    assert top is None or ours not in [Path(p).resolve() for p in (top.submodule_search_locations or [])]


def test_demo_runs(tmp_path, capsys):
    from fastlora.demo import main

    assert main(["--steps", "12", "--out", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "PEFT reload" in out
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_demo_removes_its_temp_folder(tmp_path, monkeypatch, capsys):
    """Without --out the demo saves into a temp folder and removes it when it ends."""
    import tempfile

    from fastlora.demo import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    main(["--steps", "3"])
    assert "fastlora-demo-" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_public_api_documented():
    for name in fastlora.__all__:
        obj = getattr(fastlora, name)
        if callable(obj):
            assert obj.__doc__, f"fastlora.{name} has no docstring"
