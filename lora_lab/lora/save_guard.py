"""Closing the ``save_pretrained`` trap of an adapted Hugging Face model.

A transformers model whose ``q_proj`` became a LoRA layer still has ``save_pretrained``. Called on it (directly,
or by transformers' ``Trainer`` at every checkpoint), it writes ``...q_proj.original_layer.weight`` and
``...q_proj.lora.lora_A``; ``from_pretrained`` then finds no ``q_proj.weight``, initialises it at random, only
logs the missing keys, and returns a model whose logits are off by about one. Nothing in that file can be
loaded back as the adapted model, so saving it is refused with an error that says what to do instead:
``save_adapter`` (the adapter alone, PEFT's format) or ``merge_lora(model).save_pretrained`` (a plain model).

The refusal is a method of the model's class. :func:`guard` swaps the adapted model's class for a subclass of
the same name whose ``save_pretrained`` raises (what PEFT achieves by wrapping the model in a ``PeftModel``);
:func:`unguard` swaps it back once no LoRA layer is left (``merge_lora`` does). Only classes that have a
``save_pretrained`` (transformers' ``PreTrainedModel`` and look-alikes) are touched.
"""

from __future__ import annotations

from torch import nn

__all__ = ["SAVE_PRETRAINED_HINT", "guard", "unguard", "is_guarded"]

SAVE_PRETRAINED_HINT = (
    "save the adapter with lora_lab.save_adapter(model, directory) (PEFT's format: it loads with "
    "PeftModel.from_pretrained or lora_lab.load_adapter), or a plain model with "
    "lora_lab.merge_lora(model).save_pretrained(directory)"
)

_GUARDED: dict[type, type] = {}  # original class -> its guarded subclass, built once per class


def _refuse_save_pretrained(self: nn.Module, *args, **kwargs) -> None:
    raise RuntimeError(
        f"{type(self).__name__}.save_pretrained refused: the model holds unmerged LoRA layers, and the checkpoint "
        "would store them as '...original_layer.weight' and '...lora.lora_A' keys, which from_pretrained cannot "
        "load (it would re-initialise those weights at random). Nothing was written; " + SAVE_PRETRAINED_HINT
    )


def is_guarded(model: nn.Module) -> bool:
    return type(model) in _GUARDED.values()


def guard(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) refuse; a no-op for models
    without ``save_pretrained`` and for models already guarded."""
    cls = type(model)
    if is_guarded(model) or not callable(getattr(cls, "save_pretrained", None)):
        return
    if cls not in _GUARDED:
        namespace = {
            "save_pretrained": _refuse_save_pretrained,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        _GUARDED[cls] = type(cls.__name__, (cls,), namespace)
    model.__class__ = _GUARDED[cls]


def unguard(model: nn.Module) -> None:
    """Give ``model`` its original class back (after its LoRA layers were merged away)."""
    if is_guarded(model):
        model.__class__ = type(model).__mro__[1]


def record_untied_head(model: nn.Module) -> None:
    """After ``merge_lora`` gave a head tied to the input embedding its own weight ``W + ΔW``, say so in a
    transformers config: with ``tie_word_embeddings`` still true, ``from_pretrained`` would tie the saved head
    to the embedding again and silently drop the merged update."""
    config = getattr(model, "config", None)
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (getattr(config, "tie_word_embeddings", False) and callable(get_input) and callable(get_output)):
        return
    embedding, head = get_input(), get_output()
    if embedding is not None and head is not None and head.weight is not embedding.weight:
        config.tie_word_embeddings = False
