"""save_adapter / load_adapter round trips with Hugging Face PEFT, both ways."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch
from helpers import quantize_model_bnb, tiny_gpt2, tiny_llama, tiny_opt, tiny_t5, token_batches

import fastlora

peft = pytest.importorskip("peft")


def _randomise_b(model, std=0.05):
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=std)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_save_then_peft_loads_same_logits(tmp_path, use_rslora, builder):
    base = builder()
    ids = torch.randint(0, 96, (2, 10))
    model = fastlora.patch(copy.deepcopy(base), r=4, alpha=12, use_rslora=use_rslora)
    _randomise_b(model)
    ours = _logits(model, ids)
    assert (ours - _logits(base, ids)).abs().max() > 1e-3  # the adapter does something
    out = fastlora.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] == use_rslora
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(_logits(pm, ids), ours, rtol=1e-5, atol=1e-5)


def test_save_4bit_model_peft_loads(tmp_path):
    base = quantize_model_bnb(tiny_llama())
    model = fastlora.patch(copy.deepcopy(base), r=4, alpha=8)
    _randomise_b(model)
    fastlora.save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    # On the CPU, PEFT's from_pretrained re-quantises the Linear4bit weights (the nested state is
    # dropped), so whole-model logits differ by quantisation noise. Compare each layer's LoRA term.
    for name, layer in fastlora.lora_layers(model).items():
        theirs = pm.base_model.model.get_submodule(name)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(theirs(x) - theirs.base_layer(x), layer(x) - layer.base_layer(x))


def test_peft_saved_adapter_with_patterns_loads(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 10))
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0}, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    expected = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    layers = fastlora.lora_layers(model)
    assert len(layers) == 6
    down = layers["model.layers.0.mlp.down_proj"]
    v = layers["model.layers.1.self_attn.v_proj"]
    assert down.r == 2 and math.isclose(down.scaling, 8 / math.sqrt(2))
    assert v.r == 4 and math.isclose(v.scaling, 3 / math.sqrt(4))
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # ... and back out: fastlora's save of it loads into PEFT with the same logits.
    fastlora.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(pm2, ids), expected, rtol=1e-5, atol=1e-5)


def test_load_into_patched_model_overwrites(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    a = fastlora.patch(copy.deepcopy(base), r=4, alpha=8)
    _randomise_b(a)
    fastlora.save_adapter(a, tmp_path / "a")
    b = fastlora.patch(copy.deepcopy(base), r=4, alpha=8)
    fastlora.load_adapter(b, tmp_path / "a")
    torch.testing.assert_close(_logits(b, ids), _logits(a, ids))


def test_save_replaces_existing_adapter_atomically(tmp_path, monkeypatch):
    base = tiny_llama()
    model = fastlora.patch(copy.deepcopy(base), r=2, alpha=4)
    dest = tmp_path / "adapter"
    fastlora.save_adapter(model, dest)
    first = (dest / "adapter_model.safetensors").read_bytes()
    _randomise_b(model)
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fastlora.save_adapter(model, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == first  # the old adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir left behind
    monkeypatch.undo()
    fastlora.save_adapter(model, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_frozen_offset_exports_rank_2r(tmp_path):
    """A layer computing W0 + s·(B·A − B0·A0) saves as the plain rank-2r LoRA PEFT can load."""
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 8))
    for rslora in (False, True):
        model = fastlora.patch(copy.deepcopy(base), r=3, alpha=6, use_rslora=rslora)
        for layer in fastlora.lora_layers(model).values():
            layer.set_frozen_offset(torch.randn(3, layer.in_features) * 0.1, torch.randn(layer.out_features, 3) * 0.1)
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        fastlora.save_adapter(model, tmp_path / f"ga{rslora}")
        cfg = json.loads((tmp_path / f"ga{rslora}" / "adapter_config.json").read_text())
        assert cfg["r"] == 6 and math.isclose(cfg["lora_alpha"], 6 * (math.sqrt(2) if rslora else 2))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"ga{rslora}")).eval()
        torch.testing.assert_close(_logits(pm, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def _patched(base, r=2, std=0.05):
    model = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    _randomise_b(model, std)
    return model


def test_save_leaves_other_files_alone(tmp_path, monkeypatch):
    """Only the adapter's two files are written; a user's files beside them survive (as with PEFT)."""
    model = _patched(tiny_llama())
    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "tokenizer").mkdir()
    fastlora.save_adapter(model, dest)
    fastlora.save_adapter(model, dest)  # and again, over an existing adapter
    assert (dest / "notes.txt").read_text() == "mine" and (dest / "tokenizer").is_dir()
    assert sorted(p.name for p in dest.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt", "tokenizer",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the folder
    # "." is the current folder: the files go into it, nothing is renamed
    monkeypatch.chdir(dest)
    assert fastlora.save_adapter(model, ".") == fastlora.save_adapter(model, ".")
    assert sorted(p.name for p in dest.iterdir())[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="path is empty"):
        fastlora.save_adapter(model, "")
    with pytest.raises(ValueError, match="path is empty"):
        fastlora.load_adapter(tiny_llama(), "")


def test_save_respects_umask(tmp_path):
    model = _patched(tiny_llama())
    old = os.umask(0o022)
    try:
        out = fastlora.save_adapter(model, tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_save_survives_sigkill(tmp_path):
    """Kill a saving process at random points, 40 times: a reader always finds one whole adapter."""
    worker = os.path.join(os.path.dirname(__file__), "save_kill_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, worker, str(tmp_path / "ad"), "40", "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["problems"] == []
    assert sum(result["found"]) == 40 and min(result["found"]) > 0  # both adapters were seen, whole
    assert result["most_temps"] <= 2 and result["left_after"] == []  # leftovers never grow


def test_crash_between_renames_rolls_forward(tmp_path, monkeypatch):
    """The weights of the new save are in place, the config is still the old one: load the new adapter."""
    import fastlora.adapter as adapter

    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 6))
    old_model, new_model = _patched(base, r=2), _patched(base, r=4)
    dest = tmp_path / "a"
    fastlora.save_adapter(old_model, dest)
    real_replace, calls = os.replace, []

    def die_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill: no cleanup of what is already renamed
        real_replace(src, dst)

    monkeypatch.setattr(adapter.os, "replace", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        fastlora.save_adapter(new_model, dest)
    monkeypatch.undo()
    assert json.loads((dest / "adapter_config.json").read_text())["r"] == 2  # torn on disk ...
    loaded = fastlora.load_adapter(copy.deepcopy(base), dest)  # ... but read whole: the new one
    torch.testing.assert_close(_logits(loaded, ids), _logits(new_model, ids))
    fastlora.save_adapter(old_model, dest)  # the next save removes the dead save's temp file
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_damaged_files_name_the_path(tmp_path):
    model = _patched(tiny_llama())
    dest = fastlora.save_adapter(model, tmp_path / "a")
    weights, config = dest / "adapter_model.safetensors", dest / "adapter_config.json"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{weights}.*truncated"):
        fastlora.load_adapter(tiny_llama(), dest)
    weights.write_bytes(data)
    config.write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        fastlora.load_adapter(tiny_llama(), dest)


def _seq2seq_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).logits


@pytest.mark.parametrize("builder", [tiny_t5, tiny_opt])
def test_t5_and_opt_patch_train_save_peft_round_trip(tmp_path, builder):
    """An encoder-decoder (T5 reads ``wo.weight`` in its forward) and OPT: patch, train, save, PEFT loads."""
    base = builder()
    ids = torch.randint(1, 96, (2, 10))
    model = fastlora.patch(copy.deepcopy(base), r=4, alpha=8)
    torch.testing.assert_close(_seq2seq_logits(model, ids), _seq2seq_logits(base, ids))  # B = 0: the base model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ours = _seq2seq_logits(model, ids)
    assert (ours - _seq2seq_logits(base, ids)).abs().max() > 1e-4
    fastlora.save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    torch.testing.assert_close(_seq2seq_logits(pm, ids), ours, rtol=1e-5, atol=1e-5)
    again = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(_seq2seq_logits(again, ids), ours, rtol=1e-5, atol=1e-5)


def test_lora_ga_on_t5(tmp_path):
    base = tiny_t5()
    ids = torch.randint(1, 96, (2, 10))
    data = [{"input_ids": b["input_ids"] + 1, "labels": b["labels"] + 1} for b in token_batches(2, vocab=95)]
    model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=2, alpha=4, data=data, iters=2)
    # at init the patched model equals the base (the offset cancels the initial update)
    torch.testing.assert_close(_seq2seq_logits(model, ids), _seq2seq_logits(base, ids), rtol=1e-4, atol=1e-4)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    fastlora.save_adapter(model, tmp_path / "ga")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ga")).eval()
    torch.testing.assert_close(_seq2seq_logits(pm, ids), _seq2seq_logits(model, ids), rtol=1e-4, atol=1e-4)
