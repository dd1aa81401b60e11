"""The contenders the benchmark races: one GPT, adapted six ways with the same targets and rank.

* ``full``: full fine-tuning, every parameter trains (the baseline of every "/ full" ratio).
* ``lora_lab``: :func:`lora_lab.apply_lora_to_model` with the fused fast path (the default).
* ``lora_lab_plain``: the same with ``fused=False``, the readable ``original_layer(x) + lora(x)``.
* ``peft``: Hugging Face PEFT's LoRA layers (``inject_adapter_in_model``).
* ``loralib``: Microsoft's loralib (the paper authors' code), its ``lora.Linear`` in place of
  each target ``nn.Linear``.
* ``course``: the original course module's layer, which materialises ``B·Aᵀ`` on every call
  (copied below verbatim, as the contrast).
* ``frozen``: no adapter and every weight frozen; only the target layers' biases train (BitFit,
  Ben Zaken et al. 2021). Autograd then runs the very graph LoRA needs — the gradient reaches
  the output of every target layer, and its input wherever something below still trains —
  with no weight gradient and, in place of the rank-r products, one cheap sum per layer. No
  adapter on those layers can cost less: it is the floor under every "LoRA / full" ratio.

Every LoRA variant trains exactly the same number of parameters; :func:`build_variant`
checks it, so a ratio never compares different amounts of work by accident.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lora_lab import apply_lora_to_model, find_target_modules

#: LoRA on every projection of every block, lm_head left alone (lora-cost.md's setting).
TARGETS = ("q", "k", "v", "o", "up", "down")

VARIANTS = ("full", "lora_lab", "lora_lab_plain", "peft", "loralib", "course", "frozen")

# --------------------------------------------------------------------------- the course's code
# Copied from the original course module (module 06-LoRA's README, /work/shared/seed), names
# and comments translated, for contrast only: lora_lab.lora.layers is the corrected version. Its
# forward builds ΔW = B·Aᵀ (d_out × d_in) on every call, so autograd adds a full weight-gradient
# product to each backward pass — the cost LoRA exists to avoid.


class CourseLoRALayer(nn.Module):
    """THE SEED'S CODE (not lora_lab's): materialises ΔW under autograd."""

    def __init__(self, in_features, out_features, rank=4, alpha=1.0):
        super().__init__()
        # Low-rank matrices
        self.lora_A = nn.Parameter(torch.randn(in_features, rank) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x):
        # LoRA: h = x @ (B @ A^T) * scaling
        delta_W = self.lora_B @ self.lora_A.T
        h = x @ delta_W.T
        return h * self.scaling


class CourseLoRALinear(nn.Module):
    """THE SEED'S CODE (not lora_lab's): turns a linear layer into a LoRA layer."""

    def __init__(self, original_layer, rank=4, alpha=1.0):
        super().__init__()
        self.original_layer = original_layer
        self.lora = CourseLoRALayer(original_layer.in_features, original_layer.out_features, rank, alpha)

        for param in self.original_layer.parameters():
            param.requires_grad = False

    def forward(self, x):
        return self.original_layer(x) + self.lora(x)  # y = Wx + h


# --------------------------------------------------------------------------- builders


def _replace_targets(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every target ``nn.Linear`` replaced by ``make(layer)``."""
    adapted = copy.deepcopy(model)
    for name in find_target_modules(adapted, list(TARGETS)):
        parent_name, _, child_name = name.rpartition(".")
        parent = adapted.get_submodule(parent_name) if parent_name else adapted
        setattr(parent, child_name, make(getattr(parent, child_name)))
    return adapted


def _loralib_linear(layer: nn.Linear, rank: int, alpha: float) -> nn.Module:
    import loralib

    # merge_weights=False: loralib would otherwise fold ΔW into W on every .eval() and out again
    # on .train(), which the step being timed should not include.
    new = loralib.Linear(
        layer.in_features, layer.out_features, r=rank, lora_alpha=alpha, merge_weights=False,
        bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def _freeze_all_but_lora(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name  # PEFT: ...q.lora_A.default.weight; loralib, course: ...q.lora_A


def build_variant(variant: str, base: nn.Module, rank: int = 4, alpha: float = 1.0) -> nn.Module:
    """``base`` (not modified) adapted as ``variant``, with only the parameters it trains
    marked ``requires_grad``."""
    if variant == "full":
        model = copy.deepcopy(base)
        for param in model.parameters():
            param.requires_grad = True
    elif variant == "frozen":
        model = copy.deepcopy(base)
        for param in model.parameters():
            param.requires_grad = False
        for layer in _targets(model):
            if layer.bias is None:
                raise ValueError("the 'frozen' floor trains the target layers' biases; this model has none "
                                 "(bias=False): build it with bias=True")
            layer.bias.requires_grad = True
    elif variant in ("lora_lab", "lora_lab_plain"):
        model = apply_lora_to_model(base, rank, alpha, target_modules=list(TARGETS), fused=variant == "lora_lab")
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
        model = inject_adapter_in_model(config, copy.deepcopy(base))
        _freeze_all_but_lora(model)
    elif variant == "loralib":
        model = _replace_targets(base, lambda layer: _loralib_linear(layer, rank, alpha))
        _freeze_all_but_lora(model)
    elif variant == "course":
        model = _replace_targets(base, lambda layer: CourseLoRALinear(layer, rank, alpha))
        _freeze_all_but_lora(model)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if variant not in ("full", "frozen"):
        expected = sum(rank * (m.in_features + m.out_features) for m in _targets(base))
        got = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if got != expected:
            raise RuntimeError(
                f"variant {variant!r} trains {got} parameters, expected {expected} (rank {rank} on {TARGETS}); "
                "the comparison would not be like for like"
            )
    return model


def _targets(model: nn.Module) -> list[nn.Linear]:
    return [model.get_submodule(name) for name in find_target_modules(model, list(TARGETS))]
