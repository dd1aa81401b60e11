"""LoRA on Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP projections).

``transformers.pytorch_utils.Conv1D`` is a linear layer stored the other way round: its weight is
``(in_features, out_features)`` and it computes ``y = x W + b`` (``nf`` outputs, ``nx`` inputs). The
adapter does not care: ``lora_A`` stays ``(r, in)`` and ``lora_B`` ``(out, r)``, exactly as PEFT keeps them
(PEFT marks such layers ``fan_in_fan_out=True``, which only says how the *base* weight is stored). Only
merging differs: the update is added transposed, ``W + ΔWᵀ``.

transformers is never imported here. A ``Conv1D`` object can only exist once its module has been imported,
so :func:`is_conv1d` looks the class up in ``sys.modules``; lora_lab keeps working without transformers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .layers import LoRALayer, LoRALinear

__all__ = ["LoRAConv1D", "is_conv1d", "is_linear_like", "linear_shape"]

_CONV1D_MODULE = "transformers.pytorch_utils"


def is_conv1d(module: nn.Module) -> bool:
    """True for an instance of transformers' ``Conv1D`` (subclasses included)."""
    conv1d = getattr(sys.modules.get(_CONV1D_MODULE), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers LoRA adapts here: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoRAConv1D(LoRALinear):
    """A ``Conv1D`` wrapped with a LoRA adapter: ``original_layer(x) + lora(x)``.

    The same layer as :class:`~lora_lab.lora.layers.LoRALinear` (so ``merge_lora``, ``save_adapter``,
    ``load_adapter`` and ``disable_lora`` treat it alike); only the base weight's layout differs, and with
    it :meth:`merged_weight`. It always computes on the readable path (``FusedLoRALinear`` assumes
    ``F.linear``'s layout).
    """

    def __init__(self, original_layer: nn.Module, rank: int = 4, alpha: float = 1.0, **layer_options) -> None:
        if not is_conv1d(original_layer):
            raise TypeError(f"LoRAConv1D wraps transformers' Conv1D, got {type(original_layer).__name__}")
        nn.Module.__init__(self)  # LoRALinear.__init__ checks for an nn.Linear, which this is not
        self.original_layer = original_layer
        in_features, out_features = linear_shape(original_layer)
        weight = original_layer.weight
        self.lora = LoRALayer(
            in_features, out_features, rank, alpha, device=weight.device, dtype=weight.dtype, **layer_options
        )
        for param in self.original_layer.parameters():
            param.requires_grad = False
        self.merged = False
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.original_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.original_layer.weight.shape[1]

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + ΔWᵀ`` (``Conv1D`` stores ``W`` as ``(in, out)``), a new tensor; refused when not finite."""
        weight = self.original_layer.weight
        merged = weight + self.lora.delta_weight().t().to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                "would produce non-finite weights (the adapter holds NaN/inf or overflows the weight's dtype); "
                "check the adapter's training"
            )
        return merged
