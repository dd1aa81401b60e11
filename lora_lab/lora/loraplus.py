"""LoRA+: a larger learning rate for B than for A (Hayou et al. 2024, arXiv 2402.12354).

In ``ΔW = B A`` the two factors are not symmetric: B starts at zero and A at random, and for wide
layers the paper shows that one learning rate for both is inefficient — B should learn faster,
``η_B = λ · η_A`` with ``λ`` around 16. Nothing changes in the layer; only the optimiser's
parameter groups do.

The groups are those of PEFT's ``create_loraplus_optimizer`` (peft 0.21): a parameter is in a
"B" group when its name contains ``lora_B`` *or* it is one-dimensional (a DoRA magnitude or a
trained bias), else in group "A"; B-type parameters whose name contains ``bias`` (or that belong
to a LayerNorm) get no weight decay. PEFT's fourth group, embeddings' adapters at their own
learning rate, is empty here: lora_lab adapts ``nn.Linear`` layers only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..validation import check_positive_real

__all__ = ["loraplus_param_groups", "create_loraplus_optimizer"]


def _decayed(model: nn.Module) -> set[str]:
    """Parameter names PEFT's ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` keeps, less biases."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if "bias" not in name:
                names.add(name)
    return names


def loraplus_param_groups(
    model: nn.Module, lr: float, loraplus_lr_ratio: float, *, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in PEFT's LoRA+ groups, in PEFT's order:
    A at ``lr``; B at ``lr · loraplus_lr_ratio`` (with and without weight decay). Empty groups are
    left out (torch's optimisers accept them, but they only clutter ``param_groups``)."""
    check_positive_real("lr", lr)
    check_positive_real("loraplus_lr_ratio", loraplus_lr_ratio)
    if isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number ≥ 0, got {weight_decay!r}")
    decayed = _decayed(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            (group_b if name in decayed else group_b_no_decay).append(param)
        else:
            group_a.append(param)
    if not (group_a or group_b or group_b_no_decay):
        raise ValueError("the model has no trainable parameter; adapt it with apply_lora_to_model first")
    groups = [
        {"params": group_a, "weight_decay": weight_decay, "lr": lr},
        {"params": group_b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return [group for group in groups if group["params"]]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer`` for a lora_lab model: ``optimizer_cls`` over
    :func:`loraplus_param_groups` (``loraplus_weight_decay`` in ``kwargs`` is the groups' decay)."""
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)
