"""Hugging Face ``transformers.Trainer`` integration: checkpoints that are PEFT adapters.

A patched Hugging Face model gets its own ``save_pretrained`` (an instance attribute, removed by
:func:`fastlora.unpatch`) that writes the PEFT LoRA adapter instead of the whole model, as a
``PeftModel`` does. ``Trainer`` saves through it, so every checkpoint and ``trainer.save_model()``
hold ``adapter_config.json`` + ``adapter_model.safetensors``, loadable by :func:`fastlora.load_adapter`
and ``peft.PeftModel.from_pretrained``.

``Trainer`` resumes a checkpoint by loading a full state dict unless the model is a ``PeftModel``;
:class:`TrainerMixin` teaches it to load a fastlora adapter checkpoint instead.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ._dist import unwrap_ddp
from .adapter import CONFIG_NAME, load_adapter, save_adapter
from .patching import lora_layers, register_model_hooks

__all__ = ["TrainerMixin"]


class AdapterSavePretrained:
    """A patched model's ``save_pretrained``: writes the PEFT adapter, as ``PeftModel.save_pretrained`` does.

    An object rather than a bound method so that the override survives ``copy.deepcopy`` and
    pickling of the model (a pickled bound method would come back as the class's own).
    """

    def __init__(self, model: nn.Module, marked_adapters: bool = False) -> None:
        self.model = model
        self.marked_adapters = marked_adapters  # we set the model's _hf_peft_config_loaded (see install)

    def __reduce__(self) -> tuple[type, tuple[nn.Module, bool]]:
        return type(self), (self.model, self.marked_adapters)

    def __call__(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Save the LoRA layers as a PEFT adapter in ``save_directory``.

        ``state_dict`` (a full model state dict some engines pass) is not needed: the adapter is
        read from the LoRA layers. Serialization options do not apply; ``push_to_hub`` is refused.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "fastlora: save_pretrained(push_to_hub=True) is not supported on a patched model; save, then upload "
                "the folder with huggingface_hub.upload_folder"
            )
        if is_main_process:
            save_adapter(self.model, save_directory)


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def install_save_pretrained(model: nn.Module) -> None:
    """Give a patched Hugging Face model the adapter-writing ``save_pretrained`` (an instance attribute).

    A quantized model (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``) is also
    marked as carrying trainable adapters (``_hf_peft_config_loaded``, transformers' flag for its own
    PEFT integration): ``Trainer`` refuses to train a quantized model without it, and gradient
    checkpointing then makes the embeddings' output require grad, as it does for PEFT.
    """
    if not _is_transformers_model(model) or "save_pretrained" in vars(model):
        return
    mark = bool(getattr(model, "is_quantized", False)) and not getattr(model, "_hf_peft_config_loaded", False)
    if mark:
        model._hf_peft_config_loaded = True
    model.save_pretrained = AdapterSavePretrained(model, mark)


def remove_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`install_save_pretrained` (the class's ``save_pretrained`` applies again)."""
    hook = vars(model).get("save_pretrained")
    if isinstance(hook, AdapterSavePretrained):
        del model.save_pretrained
        if hook.marked_adapters:
            vars(model).pop("_hf_peft_config_loaded", None)


def _is_adapter_dir(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, CONFIG_NAME))


class TrainerMixin:
    """Mix into ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) to resume from
    fastlora adapter checkpoints::

        class LoraTrainer(fastlora.TrainerMixin, transformers.Trainer):
            pass

    ``resume_from_checkpoint`` and ``load_best_model_at_end`` then load the adapter into the patched
    model with :func:`fastlora.load_adapter` (A and B exactly; the optimizer, scheduler and RNG
    states come from the checkpoint as usual), so a resumed run continues as the uninterrupted one.
    Checkpoints that are not adapters, or an unpatched model, go to ``Trainer``'s own loading.
    """

    def _fastlora_model(self, model: nn.Module | None) -> nn.Module | None:
        model = unwrap_ddp(model if model is not None else self.model)
        return model if lora_layers(model) else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self._fastlora_model(model)
        if target is not None and _is_adapter_dir(resume_from_checkpoint):
            load_adapter(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        target = self._fastlora_model(None)
        best = self.state.best_model_checkpoint
        if target is not None and _is_adapter_dir(best):
            load_adapter(target, best)
            return
        super()._load_best_model()


register_model_hooks(install_save_pretrained, remove_save_pretrained)
