"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits the adapted weight into a direction and a length. With ``V = W + s·B A`` (plain LoRA's
weight) and a trainable magnitude vector ``m``, one entry per output feature,

    W' = m ⊙ V / ‖V‖_c            y = x W'ᵀ + b

``‖V‖_c`` is the paper's column norm: the paper writes ``W ∈ R^{d×k}`` acting as ``x W``, so a
column is one *output* feature. In PyTorch's row layout (``weight`` is ``(out, in)``) that is the
norm of each **row**, ``torch.linalg.norm(V, dim=1)`` — exactly what PEFT computes
(``DoraLinearLayer.get_weight_norm``). ``m`` starts at ``‖W‖_c``, so a fresh DoRA layer (B = 0) is
the base layer.

Backward, as PEFT and the paper's §4.3: the norm ``‖V‖_c`` is **detached**, a constant in the
gradient graph that still follows the current ``V`` in the forward pass. ``m`` gets the gradient of
``V/‖V‖_c``, and A and B that of plain LoRA scaled by ``m/‖V‖_c``.

With dropout, the adapter sees ``x̃ = dropout(x)`` and PEFT computes
``y = x Wᵀ + b + (m/‖V‖ − 1) ⊙ x̃ Wᵀ + (m/‖V‖) ⊙ s·x̃ Aᵀ Bᵀ``; without dropout (``x̃ = x``) that is
the formula above. This layer computes the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import LoRALinear

__all__ = ["DoRALinear", "MAGNITUDE_NAME"]

#: The magnitude's parameter name: PEFT's, so adapter files name it the same way.
MAGNITUDE_NAME = "lora_magnitude_vector"


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(weight, dim=1)


class DoRALinear(LoRALinear):
    """An ``nn.Linear`` adapted by DoRA: LoRA's ``A`` and ``B`` (see
    :class:`~lora_lab.lora.layers.LoRALinear`) plus the magnitude ``lora_magnitude_vector``
    (``out_features`` entries, initialised to the row norms of ``W``).

    Refused for a weight with an all-zero row: its direction ``V/‖V‖`` is undefined.
    Merging folds ``m ⊙ V/‖V‖`` into a new weight; :meth:`unmerge` restores ``W`` exactly (it was
    kept aside, as for plain LoRA).
    """

    def __init__(self, original_layer: nn.Linear, rank: int = 4, alpha: float = 1.0, **layer_options) -> None:
        # Checked before the parent freezes anything, so a refused layer is left as it was given.
        if isinstance(original_layer, nn.Linear):
            with torch.no_grad():
                norms = _row_norms(original_layer.weight.float())
            if not (torch.isfinite(norms).all() and (norms > 0).all()):
                zero = [int(i) for i in torch.nonzero(~(norms > 0) | ~torch.isfinite(norms)).flatten()[:5]]
                raise ValueError(
                    f"DoRA needs every output row of the weight to have a finite, non-zero norm (its direction "
                    f"W/‖W‖ is divided by it); rows {zero} do not. Use plain LoRA for this layer"
                )
        super().__init__(original_layer, rank, alpha, **layer_options)
        with torch.no_grad():  # after a PiSSA init too: W_res + s·B A is W again
            magnitude = self.weight_norm()
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B A‖_c``: one norm per output feature (a row of PyTorch's ``(out, in)`` weight)."""
        weight = self.original_layer.weight
        return _row_norms(weight + self.lora.delta_weight().to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.original_layer(x)
        lora, weight, bias = self.lora, self.original_layer.weight, self.original_layer.bias
        # Detached, as in PEFT and the paper's §4.3: the norm follows V forward, gets no gradient.
        scale = self.lora_magnitude_vector / self.weight_norm().detach()
        x_lora = lora.dropout(x)
        update = (x_lora @ lora.lora_A.t() * lora.scaling) @ lora.lora_B.t()
        if x_lora is x:  # no dropout: y = (m/‖V‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
            return F.linear(x, weight) * scale + update * scale + (0 if bias is None else bias)
        return self.original_layer(x) + F.linear(x_lora, weight) * (scale - 1) + update * scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``m ⊙ V / ‖V‖_c`` as a new tensor (``W`` is not touched); refused when not finite."""
        weight = self.original_layer.weight
        direction = weight + self.lora.delta_weight().to(weight.dtype)
        merged = direction * (self.lora_magnitude_vector / _row_norms(direction)).unsqueeze(1).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                "would produce non-finite weights (the adapter or magnitude holds NaN/inf, or a row of W + ΔW is "
                "zero); check the adapter's training"
            )
        return merged
