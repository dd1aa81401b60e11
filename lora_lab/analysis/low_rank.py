"""How low-rank is the update ``ΔW`` that fine-tuning learned?

* :func:`delta_weights` gives ``ΔW`` per linear layer — ``W_ft − W`` for full fine-tuning,
  ``scaling · B A`` for LoRA — and :func:`layer_type` groups layers by role across blocks.
* :func:`singular_values`, :func:`energy_curve`, :func:`effective_rank` and
  :func:`energy_captured` measure its spectrum: by Eckart–Young, the energy beyond the top ``r``
  singular values is exactly what the best rank-``r`` matrix misses.
* :func:`subspace_similarity` is Hu et al.'s (2021, arXiv 2106.09685, §7.2, eq. 4) normalised
  subspace similarity between adapters of different rank, and
  :func:`random_subspace_similarity` the level two random subspaces reach by chance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..lora import lora_modules
from ..validation import check_positive_int

__all__ = [
    "delta_weights",
    "layer_type",
    "singular_values",
    "energy_curve",
    "effective_rank",
    "energy_captured",
    "subspace_similarity",
    "subspace_similarity_matrix",
    "random_subspace_similarity",
]


# --- the update ΔW -----------------------------------------------------------------------------


def delta_weights(base: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """The weight update ``ΔW`` (``out × in``) of each linear layer, by module name.

    For a LoRA model (one holding :class:`~lora_lab.lora.LoRALinear` layers) these are the
    adapted layers, with ``ΔW = scaling · B A`` (``LoRALayer.delta_weight()``); the frozen
    weights are checked to be ``base``'s, so that ``ΔW`` is exactly ``merged − base``. For any
    other model (full fine-tuning) it is ``W_ft − W_base`` for every ``nn.Linear`` of ``base``,
    which ``finetuned`` must hold under the same names and shapes. Both are modules (a
    :class:`~lora_lab.experiment.stages.TrainedModel`'s ``.model``). Tensors are detached CPU copies.
    """
    if lora_modules(base):
        raise ValueError("base holds LoRA layers; pass the original base model (the one the fine-tuning started from)")
    base_linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    adapters = lora_modules(finetuned)
    deltas: dict[str, torch.Tensor] = {}
    if adapters:
        for name, module in adapters.items():
            if name not in base_linears:
                raise ValueError(f"the LoRA model adapts {name!r}, which is not an nn.Linear of base")
            reference = base_linears[name].weight.detach().cpu()
            delta = module.lora.delta_weight().detach().cpu().to(reference.dtype)
            frozen = module.original_layer.weight.detach().cpu()
            if module.merged:  # the weight holds W + ΔW: take ΔW back out, up to rounding
                frozen_ok = frozen.shape == reference.shape and torch.allclose(frozen - delta, reference, atol=1e-5)
            else:
                frozen_ok = torch.equal(frozen, reference)
            if not frozen_ok:
                raise ValueError(
                    f"the frozen weight of {name} differs from base's: the LoRA model was not made from this base "
                    "(or its frozen weights were changed); pass the base model it was adapted from"
                )
            deltas[name] = delta.clone()
        return deltas
    tuned_linears = {name: m for name, m in finetuned.named_modules() if isinstance(m, nn.Linear)}
    missing = [name for name in base_linears if name not in tuned_linears]
    if missing:
        raise ValueError(
            f"the fine-tuned model has no nn.Linear named {', '.join(missing)}; delta_weights compares two models of "
            "the same architecture (the fine-tuned one made from base)"
        )
    for name, module in base_linears.items():
        before, after = module.weight.detach().cpu(), tuned_linears[name].weight.detach().cpu()
        if before.shape != after.shape:
            raise ValueError(f"{name}: base weight {tuple(before.shape)} vs fine-tuned {tuple(after.shape)}")
        deltas[name] = (after - before).clone()
    return deltas


_INDEXED = re.compile(r"^(?:.*\.)?\d+\.(?P<rest>.+)$")


def layer_type(name: str) -> str:
    """A layer's role without its block index: ``"blocks.3.attn.q"`` → ``"attn.q"``;
    names outside a numbered container (``"lm_head"``) are returned unchanged."""
    match = _INDEXED.match(name)
    return match["rest"] if match else name


# --- its spectrum ------------------------------------------------------------------------------


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of a matrix, in descending order, as float64."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
        raise ValueError(f"singular_values needs a 2-D tensor, got {getattr(delta, 'shape', type(delta).__name__)}")
    matrix = delta.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError("the matrix holds NaN or infinite values; its singular values are undefined")
    return torch.linalg.svdvals(matrix)


def _check_spectrum(s: torch.Tensor | Sequence[float]) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.dim() != 1 or not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("expected a 1-D tensor of finite, non-negative singular values")
    return torch.sort(s, descending=True).values


def energy_curve(s: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``Σ_{j≤k} σ_j² / Σ σ_j²`` for k = 1, 2, …: the share of ``‖ΔW‖_F²`` that the top k
    directions hold (float64, ending at 1). All ones for a zero matrix: nothing is left to miss."""
    power = _check_spectrum(s) ** 2
    total = power.sum()
    return torch.cumsum(power, 0) / total if total > 0 else torch.ones_like(power)


def effective_rank(s: torch.Tensor | Sequence[float], energy: float = 0.9) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of ``Σσ²`` (= ``‖ΔW‖_F²``):
    the rank a truncated SVD needs to keep that fraction of the update. 0 for a zero matrix."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    if not _check_spectrum(s).any():
        return 0  # no direction holds any energy, so none is needed
    cumulative = energy_curve(s)
    # A relative slack of 1e-12 so that energy=1 is reached despite rounding in the cumulative sum.
    k = int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1
    return min(k, len(cumulative))


def energy_captured(s: torch.Tensor | Sequence[float], k: int) -> float:
    """``Σ_{i≤k} σ_i² / Σ σ_i²``: the share of ``‖ΔW‖_F²`` that the best rank-k approximation
    keeps (Eckart–Young: ``1 −`` this is its relative squared error). 1.0 for a zero matrix."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    power = _check_spectrum(s) ** 2
    total = float(power.sum())
    return 1.0 if total == 0 else float(power[:k].sum()) / total


# --- subspace similarity (Hu et al. 2021, §7.2) --------------------------------------------------


def _right_singular_vectors(A: torch.Tensor, name: str) -> torch.Tensor:
    """Columns: A's right-singular vectors (in R^k for A ∈ R^{r×k}), by descending singular value."""
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (r × k, like lora_A), got {getattr(A, 'shape', A)!r}")
    matrix = A.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh.T


def _singular_vector_pair(A1: torch.Tensor, A2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    V1, V2 = _right_singular_vectors(A1, "A1"), _right_singular_vectors(A2, "A2")
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(
            f"the two A matrices act on spaces of different size ({V1.shape[0]} vs {V2.shape[0]} columns); "
            "compare adapters of the same layer"
        )
    return V1, V2


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """Hu et al.'s normalised subspace similarity (§7.2, eq. 4)::

        φ(A1, A2, i, j) = ‖U1^{i ᵀ} U2^{j}‖_F² / min(i, j)  ∈ [0, 1]

    where ``U^i`` holds the top-i right-singular vectors of ``A`` (``A ∈ R^{r×k}``, ``lora_A``'s
    layout, so the vectors live in the layer's input space R^k). φ is 1 when one subspace
    contains the other and 0 when they are orthogonal; ``φ(A1, A2, i, j) = φ(A2, A1, j, i)``.
    Two random subspaces give ``max(i, j) / k`` on average (:func:`random_subspace_similarity`).
    ``1 ≤ i ≤ min(r1, k)``, ``1 ≤ j ≤ min(r2, k)``.
    """
    V1, V2 = _singular_vector_pair(A1, A2)
    for label, value, limit in (("i", i, V1.shape[1]), ("j", j, V2.shape[1])):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{label} must be an int in [1, {limit}] (the number of singular vectors), got {value!r}")
    overlap = float((V1[:, :i].T @ V2[:, :j]).pow(2).sum())
    return min(1.0, max(0.0, overlap / min(i, j)))  # clipped against rounding only (exact bounds: 0 and 1)


def subspace_similarity_matrix(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """``φ(A1, A2, i, j)`` for every ``i`` and ``j`` at once: entry ``[i-1, j-1]``, a float64
    tensor of shape ``(min(r1, k), min(r2, k))``. ``‖U1^{iᵀ}U2^{j}‖_F²`` is the sum of the
    squared cosines ``(v1_a · v2_b)²`` over ``a ≤ i, b ≤ j``: a 2-D cumulative sum."""
    V1, V2 = _singular_vector_pair(A1, A2)
    overlap = (V1.T @ V2).pow(2).cumsum(0).cumsum(1)
    i = torch.arange(1, V1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, V2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (overlap / torch.minimum(i, j)).clamp(0.0, 1.0)


def random_subspace_similarity(k: int, i: int, j: int) -> float:
    """The expected φ of an i- and a j-dimensional subspace of R^k drawn independently and
    uniformly: ``E‖U1ᵀU2‖_F² = i·j/k``, so ``φ = max(i, j) / k`` — the level of chance overlap.
    It is small for Hu et al.'s GPT-3 (k = 12288) but not for a layer of width 128."""
    k, i, j = (check_positive_int(n, v) for n, v in (("k", k), ("i", i), ("j", j)))
    if max(i, j) > k:
        raise ValueError(f"subspaces of R^{k} have at most {k} dimensions, got i={i}, j={j}")
    return max(i, j) / k


# --- the spectrum in numbers (what the PDF reads next to its figure) -----------------------------


def spectrum_summary(
    full_deltas: Mapping[str, torch.Tensor], lora_deltas: Mapping[str, torch.Tensor], rank: int
) -> dict[str, dict[str, float]]:
    """Per layer type (:func:`layer_type`), averaged over the blocks: the share of full
    fine-tuning's ``‖ΔW‖_F²`` that its top ``rank`` directions hold (``full_energy_top_r``: what
    the best rank-r matrix keeps), and the number of directions that hold 90% and 99% of each
    update's energy (``full_k90``, ``lora_k90``, ``lora_k99``): LoRA's own update uses at most
    ``rank`` of them by construction, and fewer when it saturates."""
    check_positive_int("rank", rank)
    summary: dict[str, dict[str, float]] = {}
    kinds = sorted({layer_type(name) for name in full_deltas})
    for kind in kinds:
        full = [singular_values(d) for n, d in full_deltas.items() if layer_type(n) == kind]
        lora = [singular_values(d) for n, d in lora_deltas.items() if layer_type(n) == kind]
        row = {
            "full_energy_top_r": sum(energy_captured(s, rank) for s in full) / len(full),
            "full_k90": sum(effective_rank(s, 0.9) for s in full) / len(full),
        }
        if lora:
            row["lora_k90"] = sum(effective_rank(s, 0.9) for s in lora) / len(lora)
            row["lora_k99"] = sum(effective_rank(s, 0.99) for s in lora) / len(lora)
        summary[kind] = row
    return summary
