"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, arXiv 2404.02948).

Plain LoRA starts from ``B = 0``: the adapter is a blank update. PiSSA starts it on the part of
``W`` that matters most: with the SVD ``W = U S Vᵀ`` and its top ``r`` triplets,

    A = √(S_r / s) V_rᵀ        B = U_r √(S_r / s)        W_res = W − s·B A

so ``s·B A = U_r S_r V_rᵀ`` (the best rank-r approximation of ``W``, Eckart–Young) and the frozen
base keeps only the residual. At step 0, ``W_res + s·B A = W``: the adapted model *is* the base
(up to float rounding). Training then moves the principal directions directly.

The computation is PEFT's (``LoraLayer.pissa_init``, ``init_lora_weights="pissa"``: a full SVD in
float32, ``S_r`` divided by the scaling), so the same ``W`` gives the same A, B and ``W_res``.

A PiSSA adapter fits the *residual* base, not ``W``. Two ways to use it on a plain base:

* save it as it is (``init_lora_weights: "pissa"`` in its config): a loader — PEFT's or
  :func:`lora_lab.load_adapter` into ``apply_lora_to_model(base, ..., init="pissa")`` — recomputes
  the SVD from the plain base, rebuilds ``W_res`` and loads the trained A and B;
* convert it (:func:`pissa_to_lora`, PEFT's ``path_initial_model_for_weight_conversion``):
  ``W_res + s·B A = W + s·(B A − B₀ A₀) = W + s·[B | −B₀][A ; A₀]``, a plain LoRA adapter of rank
  ``2r`` (α doubled, or ×√2 with rsLoRA, so the scaling is unchanged) on the original ``W``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .layers import LoRALinear

__all__ = ["pissa_factors", "pissa_initialise", "check_pissa_rank", "pissa_to_lora"]


def check_pissa_rank(layer: nn.Linear, rank: int) -> None:
    """PiSSA takes ``rank`` singular triplets: refuse a rank the weight does not have."""
    most = min(layer.in_features, layer.out_features)
    if rank > most:
        raise ValueError(
            f"PiSSA takes the top-r singular triplets of W, and this layer's {layer.out_features}×{layer.in_features} "
            f"weight has only {most}; choose rank ≤ {most} or another init"
        )


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``s·B A`` the best rank-``rank`` approximation of ``weight`` (float32, as PEFT)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    return torch.diag(root) @ Vh[:rank], U[:, :rank] @ torch.diag(root)


@torch.no_grad()
def pissa_initialise(layer: LoRALinear) -> None:
    """Set ``layer``'s A and B from its weight's top singular triplets and give the base the
    residual ``W − s·B A`` — as a new tensor, so a weight shared with other modules is not changed."""
    base, lora = layer.original_layer, layer.lora
    check_pissa_rank(base, lora.rank)
    weight = base.weight
    lora_A, lora_B = pissa_factors(weight, lora.rank, lora.scaling)
    lora.lora_A.copy_(lora_A)
    lora.lora_B.copy_(lora_B)
    residual = weight.float() - lora.scaling * lora_B @ lora_A
    base.weight = nn.Parameter(residual.to(weight.dtype), requires_grad=weight.requires_grad)
    lora.init = "pissa"


def _converted_alpha(alpha: float, use_rslora: bool) -> float:
    # scaling α/r (or α/√r) must stay the same at rank 2r
    return alpha * (math.sqrt(2) if use_rslora else 2)


@torch.no_grad()
def pissa_to_lora(model: nn.Module, base: nn.Module) -> nn.Module:
    """A plain LoRA copy of ``base`` (rank ``2r``) that computes what the PiSSA-trained ``model``
    computes: the adapter PEFT writes with ``path_initial_model_for_weight_conversion``.

    ``base`` must be the model PiSSA started from; its weights give ``B₀`` and ``A₀`` again (the SVD
    is deterministic), and each of ``model``'s residuals is checked against ``W − s·B₀ A₀``, so a
    wrong base is a clear error. Neither model is modified. Save the result with
    :func:`lora_lab.save_adapter`; it loads on the plain base anywhere (PEFT included).
    """
    # inject and dora import layers, which imports this module
    from .dora import DoRALinear
    from .inject import apply_lora_to_model, lora_modules

    layers = lora_modules(model)
    pissa = {name: layer for name, layer in layers.items() if layer.lora.init == "pissa"}
    if not pissa or len(pissa) != len(layers):
        raise ValueError(
            "pissa_to_lora converts a model whose LoRA layers were all initialised with init='pissa'; "
            f"{len(pissa)} of its {len(layers)} LoRA layers were"
        )
    if any(isinstance(layer, DoRALinear) for layer in pissa.values()):
        raise ValueError("pissa_to_lora converts PiSSA-initialised LoRA layers; DoRA ones (use_dora=True) are not")
    if any(layer.merged for layer in pissa.values()):
        raise RuntimeError("unmerge the PiSSA layers before converting them")
    first = next(iter(pissa.values())).lora
    settings = {(layer.lora.rank, layer.lora.alpha, layer.lora.use_rslora) for layer in pissa.values()}
    if len(settings) > 1:
        raise ValueError(f"the PiSSA layers differ in (rank, alpha, use_rslora): {sorted(settings)}")
    initial = {}
    for name, layer in pissa.items():
        try:
            original = base.get_submodule(name)
        except AttributeError:
            original = None
        if not isinstance(original, nn.Linear) or original.weight.shape != layer.original_layer.weight.shape:
            raise ValueError(f"base has no nn.Linear {name} of the adapted layer's shape; pass PiSSA's starting base")
        lora_A0, lora_B0 = pissa_factors(original.weight, layer.lora.rank, layer.lora.scaling)
        residual = original.weight.float() - layer.lora.scaling * lora_B0 @ lora_A0
        if not torch.allclose(residual, layer.original_layer.weight.float(), rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"{name}: the model's residual weight is not W − s·B₀A₀ of this base's W; pass the base model "
                "the PiSSA adapter started from"
            )
        initial[name] = (lora_A0, lora_B0)
    converted = apply_lora_to_model(
        base, rank=2 * first.rank, alpha=_converted_alpha(first.alpha, first.use_rslora),
        target_modules=list(pissa), fused=False, use_rslora=first.use_rslora,
    )  # fmt: skip
    for name, layer in lora_modules(converted).items():
        lora_A0, lora_B0 = initial[name]
        trained = pissa[name].lora
        layer.lora.lora_A.copy_(torch.cat([trained.lora_A, lora_A0.to(trained.lora_A.dtype)], dim=0))
        layer.lora.lora_B.copy_(torch.cat([trained.lora_B, -lora_B0.to(trained.lora_B.dtype)], dim=1))
    return converted
