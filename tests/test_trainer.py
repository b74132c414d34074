"""transformers.Trainer with a fastlora-patched model: checkpoints are PEFT adapters, resume is exact."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import tiny_llama, token_batches

import fastlora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class LoraTrainer(fastlora.TrainerMixin, transformers.Trainer):
    pass


def _args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="steps", **kw,
    )  # fmt: skip


def _patched(base):
    torch.manual_seed(1)
    return fastlora.patch(copy.deepcopy(base), r=4, alpha=8)


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def test_trainer_checkpoints_are_adapters_and_resume_is_exact(tmp_path):
    base = tiny_llama()
    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in token_batches(12, seq=12)]
    ids = torch.randint(0, 96, (2, 8))

    full = _patched(base)
    trainer = LoraTrainer(model=full, args=_args(tmp_path / "full"), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for folder in (tmp_path / "full" / "checkpoint-3", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}, names
    with torch.no_grad():
        expected = full(input_ids=ids).logits
        for loaded in (
            fastlora.load_adapter(copy.deepcopy(base), tmp_path / "final"),
            peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "final")),
        ):
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    resumed = _patched(base)
    trainer = LoraTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    resumed_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and resumed_losses[3:] == pytest.approx(losses[3:], rel=1e-6)  # [:3]: from the checkpoint
    after, before = _lora_state(resumed), _lora_state(full)
    assert after.keys() == before.keys() and all(torch.allclose(after[k], before[k], atol=1e-7) for k in after)


def test_unpatch_gives_back_the_models_own_save_pretrained(tmp_path):
    model = fastlora.patch(tiny_llama(), r=2)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # the override follows the model through deepcopy and pickling
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        other.save_pretrained(tmp_path / "other")
        assert {p.name for p in (tmp_path / "other").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    fastlora.unpatch(model)
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "config.json").is_file() and not (tmp_path / "full" / "adapter_config.json").exists()


def test_trainer_trains_a_bnb_4bit_from_pretrained_model(tmp_path):
    """QLoRA the transformers way: a 4-bit model from from_pretrained, patched, under Trainer."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu"
    )
    assert model.is_quantized and type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    fastlora.patch(model, r=4, alpha=8)
    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in token_batches(8, seq=12)]
    args = _args(tmp_path / "out", gradient_checkpointing=True)
    args.max_steps, args.save_steps = 2, 2
    trainer = LoraTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0
    names = {p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    fastlora.unpatch(model)
    assert not getattr(model, "_hf_peft_config_loaded", False)  # the mark goes with the patch
