"""PEFT's spellings for :func:`~lora_lab.apply_lora_to_model`: keyword aliases, a ``peft.LoraConfig``,
and ``target_modules="all-linear"``.

A PEFT user writes ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")``. The
same words work here, translated to lora_lab's names (``rank``, ``alpha``, ``dropout``, ``init``) by
:func:`resolve_options`; everything PEFT can express but lora_lab does not compute (DoRA, per-layer
patterns, ``modules_to_save``, ...) is refused by name, never silently ignored. peft is not imported: a
``LoraConfig`` is read through its ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .conv1d import is_linear_like

__all__ = ["ALL_LINEAR", "LoRAOptions", "resolve_options", "all_linear_targets", "is_lora_config"]

#: PEFT's shorthand: every linear layer (``nn.Linear`` or ``Conv1D``) except the model's output layer.
ALL_LINEAR = "all-linear"

DEFAULT_RANK, DEFAULT_ALPHA = 4, 1.0  # apply_lora_to_model's defaults (the course's)

# PEFT keyword -> lora_lab keyword, for the options that mean the same thing.
_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
# PEFT's init_lora_weights values that lora_lab computes (True is PEFT's default, kaiming-uniform A).
_INITS = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa"}
# LoraConfig fields that do not change what is computed here: names, bookkeeping, and fan_in_fan_out (the layer
# type decides it, as PEFT itself corrects a wrong value per layer).
_INERT_CONFIG_FIELDS = {
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
    "peft_version", "fan_in_fan_out",
}  # fmt: skip
_READ_CONFIG_FIELDS = {
    "r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_rslora", "target_modules", "bias", "use_dora",
}  # fmt: skip


@dataclass
class LoRAOptions:
    """What :func:`~lora_lab.apply_lora_to_model` builds, in lora_lab's names."""

    rank: int
    alpha: float
    target_modules: str | Sequence[str] | None
    bias: str = "none"  # mark_only_lora_as_trainable's (and PEFT's) bias mode
    layer_options: dict[str, Any] = field(default_factory=dict)


def is_lora_config(value: object) -> bool:
    """True for a ``peft.LoraConfig`` (recognised without importing peft)."""
    return type(value).__name__ == "LoraConfig" and callable(getattr(value, "to_dict", None))


def _from_lora_config(config: Any) -> dict[str, Any]:
    """The LoraConfig's settings as PEFT keywords; a clear error for every field lora_lab cannot honour."""
    values = config.to_dict()
    defaults = type(config)().to_dict()
    unsupported = sorted(
        f"{key}={value!r}"
        for key, value in values.items()
        if key not in _READ_CONFIG_FIELDS | _INERT_CONFIG_FIELDS and value != defaults.get(key) and value
    )
    if unsupported:
        raise ValueError(
            f"this LoraConfig uses PEFT features lora_lab's apply_lora_to_model does not implement: "
            f"{', '.join(unsupported)}. Use PEFT's get_peft_model for them, or drop them from the config"
        )
    targets = values.get("target_modules")
    if targets is None:
        raise ValueError(
            "LoraConfig(target_modules=None) lets PEFT pick a default per architecture (e.g. q_proj and v_proj for "
            "Llama), which lora_lab does not guess: name the layers, e.g. LoraConfig(target_modules=['q_proj', "
            "'v_proj']) or target_modules='all-linear'"
        )
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = sorted(targets)
    keywords = {key: values[key] for key in _READ_CONFIG_FIELDS if key in values}
    keywords["target_modules"] = targets
    return keywords


def resolve_options(
    rank: Any, alpha: Any, target_modules: str | Sequence[str] | None, options: dict[str, Any]
) -> LoRAOptions:
    """Translate PEFT's keywords (or a ``LoraConfig`` passed as ``rank``) to lora_lab's options.

    A setting given twice, once in each spelling (``rank=8, r=8``; a ``LoraConfig`` and ``alpha=...``), is
    an error rather than a guess at which one was meant.
    """
    options = dict(options)
    if is_lora_config(rank):
        given = [name for name, value, default in (("alpha", alpha, DEFAULT_ALPHA), ("target_modules", target_modules,
                 None)) if value != default] + sorted(options.keys() & (set(_ALIASES) | set(_ALIASES.values())))
        if given:
            raise ValueError(
                f"pass either a LoraConfig or keyword options, not both (also given: {', '.join(given)}); "
                "put every setting in the LoraConfig"
            )
        peft_keywords = _from_lora_config(rank)
        target_modules = peft_keywords.pop("target_modules")
        rank, alpha = DEFAULT_RANK, DEFAULT_ALPHA
        options.update(peft_keywords)
    elif not isinstance(rank, int) and type(rank).__name__.endswith("Config") and hasattr(rank, "peft_type"):
        raise TypeError(
            f"apply_lora_to_model takes a peft.LoraConfig, got a {type(rank).__name__} (a different PEFT method); "
            "use PEFT's get_peft_model for it"
        )
    explicit = {"rank": rank != DEFAULT_RANK, "alpha": alpha != DEFAULT_ALPHA}
    values = {"rank": rank, "alpha": alpha}
    for peft_name, name in _ALIASES.items():
        if peft_name not in options:
            continue
        value = options.pop(peft_name)
        if name in options or explicit.get(name, False):
            raise ValueError(f"both {name}= and PEFT's {peft_name}= were given; pass one of them")
        if name == "init":
            if value not in _INITS:
                raise ValueError(
                    f"init_lora_weights={value!r} is not implemented here; lora_lab offers True (PEFT's default, "
                    "kaiming-uniform A, zero B), 'gaussian' and 'pissa' (or its own init='course')"
                )
            value = _INITS[value]
        if name in values:
            values[name] = value
        else:
            options[name] = value
    fan_in_fan_out = options.pop("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):
        raise ValueError(f"fan_in_fan_out must be True or False, got {fan_in_fan_out!r}")
    bias = options.pop("bias", "none")
    return LoRAOptions(values["rank"], values["alpha"], target_modules, bias, options)


def all_linear_targets(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"`` rule (peft 0.21, ``_maybe_include_all_linear_layers``): every ``nn.Linear`` and
    ``Conv1D`` except the module ``model.get_output_embeddings()`` returns (a transformers model's LM head).
    A model without that method (lora_lab's GPT) keeps all of them, as in PEFT."""
    names = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        head_name = next((name for name, module in model.named_modules() if module is head), None)
        names = [name for name in names if name != head_name]
    return names
