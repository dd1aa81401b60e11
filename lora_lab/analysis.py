"""LoRA against full fine-tuning, looked at closely: sweeps, the spectrum of ΔW, subspace
similarity and what training costs in memory.

* Sweeps (:func:`rank_sweep`, :func:`alpha_sweep`, :func:`target_sweep`) train LoRA variants of
  the tuned recipe through :func:`lora_lab.pipeline.lora_finetuned` (cached per recipe) and
  measure held-out perplexity. They train :data:`SWEEP_EPOCHS` epochs per run, fewer than the
  main recipes, so that a dozen runs fit in a few minutes on two CPU cores: a sweep compares
  recipes at one equal, short budget, not at convergence.
* :func:`delta_weights` gives the update ``ΔW`` that fine-tuning learned per linear layer —
  ``W_ft − W`` for full fine-tuning, ``scaling · B A`` for LoRA — and :func:`singular_values`,
  :func:`effective_rank`, :func:`energy_captured` and :func:`plot_spectrum` measure how low-rank
  it is (by Eckart–Young, the energy beyond the top ``r`` singular values is exactly what the
  best rank-``r`` matrix misses).
* :func:`subspace_similarity` is Hu et al.'s (2021, arXiv 2106.09685, §7.2, eq. 4) normalised
  subspace similarity between adapters of different rank, and :func:`plot_subspace_similarity`
  draws it like their Figure 3.
* :func:`optimizer_memory_bytes` is the memory model of the training state (weights, gradients
  and AdamW's two moments).
* :func:`write_sweep_outputs` writes ``sweep.json``, ``rank_sweep.png`` and ``spectrum.png``
  into a run folder for the companion PDF (``paper/build.py``); :func:`analyse_run` runs the
  rank sweep and writes them in one call.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import nn

from .evaluate import perplexity
from .inject import count_parameters, find_target_modules, lora_modules
from .io import atomic_path
from .pipeline import Experiment, LoRARecipe, entropy_floors, lora_finetuned
from .plots import LABELS, MODEL_COLORS, figure_legend, readable

__all__ = [
    "SWEEP_EPOCHS",
    "DEFAULT_RANKS",
    "DEFAULT_ALPHAS",
    "TARGET_GROUPS",
    "sweep_recipe",
    "run_sweep",
    "rank_sweep",
    "alpha_sweep",
    "target_sweep",
    "sweep_table",
    "delta_weights",
    "layer_type",
    "singular_values",
    "effective_rank",
    "energy_captured",
    "subspace_similarity",
    "subspace_similarity_matrix",
    "random_subspace_similarity",
    "optimizer_memory_bytes",
    "comparison_table",
    "plot_rank_sweep",
    "plot_sweep_bars",
    "plot_spectrum",
    "plot_subspace_similarity",
    "SWEEP_FILES",
    "write_sweep_outputs",
    "analyse_run",
]

#: Epochs per sweep run. The main recipes train ``profile.finetune_epochs`` (30 on the cpu
#: profile); 2 is a budget, not a choice of quality: the 14 runs of notebook 05's rank, rsLoRA,
#: α and target sweeps took 112 s of CPU time on one thread with the cpu profile (2 blocks of
#: width 128; 36 steps and an exact evaluation per run). Runs are therefore compared at an
#: equal, short budget: a setting that learns faster wins, even if a slower one would end up
#: better with more steps.
SWEEP_EPOCHS = 2.0

#: Hu et al.'s rank range (their Table 6 and Figure 3 go from 1 to 64).
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)

#: α at the tuned recipe's rank (16 on the cpu profile): scalings α/r from 1/16 to 4, around the tuned α = 32.
DEFAULT_ALPHAS = (1.0, 4.0, 16.0, 64.0)

#: Which linear layers get an adapter, by PEFT's ``target_modules`` rules (a name matches a
#: module named so or ending in ``.name``). ``None`` adapts every ``nn.Linear``, the output
#: layer ``lm_head`` included, as the seed does.
TARGET_GROUPS: dict[str, tuple[str, ...] | None] = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("up", "down"),
    "all": None,
}


# --- sweeps ----------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def sweep_recipe(
    exp: Experiment,
    name: str,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    lr: float | None = None,
    target_modules: Sequence[str] | None = None,
    epochs: float | None = None,
    use_rslora: bool = False,
) -> LoRARecipe:
    """The tuned recipe (``exp.tuned_recipe()``) with the given settings replaced, trained for
    ``epochs`` (default: :data:`SWEEP_EPOCHS`, or the profile's ``finetune_epochs`` if that is
    fewer). The recipe's ``name`` only labels the run: equal settings reuse one cached artifact."""
    tuned = exp.tuned_recipe()
    if epochs is None:
        epochs = min(SWEEP_EPOCHS, exp.profile.finetune_epochs)
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of module names or None, got the string {target_modules!r}")
    return LoRARecipe(
        name=name,
        rank=_positive_int("rank", tuned.rank if rank is None else rank),
        alpha=_positive_number("alpha", tuned.alpha if alpha is None else alpha),
        lr=_positive_number("lr", tuned.lr if lr is None else lr),
        target_modules=tuple(target_modules) if target_modules else None,
        epochs=_positive_number("epochs", epochs),
        use_rslora=bool(use_rslora),
    )


def run_sweep(exp: Experiment, base: nn.Module, recipes: Sequence[LoRARecipe], *, source: bool = True) -> list[dict]:
    """Train (or load from the cache) one LoRA model per recipe and measure it.

    Returns one dict per recipe, in order: ``name, rank, alpha, scaling, lr, epochs,
    target_modules, use_rslora, target_ppl, source_ppl`` (only with ``source=True``),
    ``trainable_params, total_params, train_seconds, steps``. Perplexities are exact over the
    whole validation splits (:func:`lora_lab.evaluate.perplexity`, no sampling); ``train_seconds``
    is the wall-clock time of the run that made the cached artifact.
    """
    names = [recipe.name for recipe in recipes]
    if not names:
        raise ValueError("a sweep needs at least one recipe")
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique within a sweep (they label the runs), got {names}")
    for recipe in recipes:  # a bad target list fails here, before any run has trained
        find_target_modules(base, list(recipe.target_modules) if recipe.target_modules else None)
    block = exp.profile.block_size
    runs = []
    for recipe in recipes:
        model = lora_finetuned(exp, base, recipe)
        trainable, total = count_parameters(model)
        layer = next(iter(lora_modules(model).values())).lora
        history = exp.trained[recipe.name]
        entry = {
            "name": recipe.name,
            "rank": recipe.rank,
            "alpha": recipe.alpha,
            "scaling": layer.scaling,
            "lr": recipe.lr,
            "epochs": recipe.epochs if recipe.epochs is not None else exp.profile.finetune_epochs,
            "target_modules": list(recipe.target_modules) if recipe.target_modules else None,
            "use_rslora": recipe.use_rslora,
            "target_ppl": perplexity(model, exp.splits.target_val, block, device=exp.device),
        }
        if source:
            entry["source_ppl"] = perplexity(model, exp.splits.source_val, block, device=exp.device)
        entry.update(trainable_params=trainable, total_params=total, train_seconds=history.seconds, steps=history.steps)
        runs.append(entry)
        del model  # one model at a time: a sweep's memory does not grow with its length
    return runs


def rank_sweep(
    exp: Experiment,
    base: nn.Module,
    ranks: Sequence[int] = DEFAULT_RANKS,
    *,
    alpha: float | None = None,
    lr: float | None = None,
    epochs: float | None = None,
    target_modules: Sequence[str] | None = None,
    use_rslora: bool = False,
    source: bool = True,
) -> list[dict]:
    """The tuned recipe at each rank in ``ranks``, with α held fixed (default: the tuned recipe's α).

    Fixed α is Hu et al.'s convention (§4.1: "α is a constant in r … we simply set α to the
    first r we try and do not tune it"): with Adam, whose steps have a size set by the learning
    rate and not by the gradient's scale, α acts like a learning rate for ΔW, and keeping it
    fixed is what lets r change without retuning. The scaling ``α / r`` then shrinks as r grows;
    rsLoRA (Kalajdzievski 2023) argues that this holds large ranks back and that ``α / √r``
    keeps the update's size independent of r — ``use_rslora=True`` runs that variant. Holding
    ``α / r`` fixed instead would give large ranks a larger effective step and mix the effect
    of the rank with that of the step size. See :func:`run_sweep` for the entries.
    """
    ranks = [_positive_int("rank", r) for r in ranks]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"each rank may appear only once, got {ranks}")
    tag = "_rslora" if use_rslora else ""
    recipes = [
        sweep_recipe(
            exp,
            f"sweep_r{r}{tag}",
            rank=r,
            alpha=alpha,
            lr=lr,
            target_modules=target_modules,
            epochs=epochs,
            use_rslora=use_rslora,
        )
        for r in ranks
    ]
    return run_sweep(exp, base, recipes, source=source)


def alpha_sweep(
    exp: Experiment,
    base: nn.Module,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    rank: int | None = None,
    lr: float | None = None,
    epochs: float | None = None,
    source: bool = True,
) -> list[dict]:
    """The tuned recipe (default rank: the tuned one) at each α in ``alphas``: the same model
    and learning rate, only the scaling ``α / r`` of the update changes."""
    alphas = [_positive_number("alpha", a) for a in alphas]
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"each alpha may appear only once, got {alphas}")
    recipes = [sweep_recipe(exp, f"sweep_alpha{a:g}", rank=rank, alpha=a, lr=lr, epochs=epochs) for a in alphas]
    return run_sweep(exp, base, recipes, source=source)


def target_sweep(
    exp: Experiment,
    base: nn.Module,
    groups: Mapping[str, Sequence[str] | None] = TARGET_GROUPS,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    lr: float | None = None,
    epochs: float | None = None,
    source: bool = True,
) -> list[dict]:
    """The tuned recipe with adapters on each group of layers (``{"label": [module names] or
    None}``); every entry gets a ``"group"`` key. The rank is the same for every group, so the
    groups differ in their number of trainable parameters (Hu et al.'s Table 5 instead fixes the
    parameter budget)."""
    if not groups:
        raise ValueError("target_sweep needs at least one group of target modules")
    recipes = [
        sweep_recipe(exp, f"sweep_{label}", rank=rank, alpha=alpha, lr=lr, target_modules=targets, epochs=epochs)
        for label, targets in groups.items()
    ]
    runs = run_sweep(exp, base, recipes, source=source)
    for label, entry in zip(groups, runs):
        entry["group"] = label
    return runs


def sweep_table(runs: Sequence[Mapping], key: str = "rank") -> str:
    """A sweep as a Markdown table, one row per run, labelled by ``runs[i][key]``."""
    has_source = all("source_ppl" in run for run in runs)
    header = (
        f"| {key} | r | α | α/r | trainable | target ppl |" + (" source ppl |" if has_source else "") + " train s |"
    )
    lines = [header, "|" + "---:|" * (header.count("|") - 1)]
    for run in runs:
        label = run.get(key)
        label = f"{label:g}" if isinstance(label, float) else str(label)
        row = (
            f"| {label} | {run['rank']} | {run['alpha']:g} | {run['scaling']:.3g} | {run['trainable_params']:,} | "
            f"{run['target_ppl']:.3f} |"
        )
        if has_source:
            row += f" {run['source_ppl']:.3f} |"
        lines.append(row + f" {run['train_seconds']:.1f} |")
    return "\n".join(lines)


# --- the update ΔW -----------------------------------------------------------------------------


def delta_weights(base: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """The weight update ``ΔW`` (``out × in``) of each linear layer, by module name.

    For a LoRA model (one holding :class:`~lora_lab.layers.LoRALinear` layers) these are the
    adapted layers, with ``ΔW = scaling · B A`` (``LoRALayer.delta_weight()``); the frozen
    weights are checked to be ``base``'s, so that ``ΔW`` is exactly ``merged − base``. For any
    other model (full fine-tuning) it is ``W_ft − W_base`` for every ``nn.Linear`` of ``base``,
    which ``finetuned`` must hold under the same names and shapes. Tensors are detached CPU copies.
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


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of a matrix, in descending order, as float64."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
        raise ValueError(f"singular_values needs a 2-D tensor, got {getattr(delta, 'shape', type(delta).__name__)}")
    matrix = delta.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError("the matrix holds NaN or infinite values; its singular values are undefined")
    return torch.linalg.svdvals(matrix)


def _check_spectrum(s: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.dim() != 1 or not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("expected a 1-D tensor of finite, non-negative singular values")
    return torch.sort(s, descending=True).values


def effective_rank(s: torch.Tensor | Sequence[float], energy: float = 0.9) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of ``Σσ²`` (= ``‖ΔW‖_F²``):
    the rank a truncated SVD needs to keep that fraction of the update. 0 for a zero matrix."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    power = _check_spectrum(s) ** 2
    total = power.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    # A relative slack of 1e-12 so that energy=1 is reached despite rounding in the cumulative sum.
    k = int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1
    return min(k, len(power))


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


def _check_same_space(V1: torch.Tensor, V2: torch.Tensor) -> None:
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(
            f"the two A matrices act on spaces of different size ({V1.shape[0]} vs {V2.shape[0]} columns); "
            "compare adapters of the same layer"
        )


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """Hu et al.'s normalised subspace similarity (§7.2, eq. 4)::

        φ(A1, A2, i, j) = ‖U1^{i ᵀ} U2^{j}‖_F² / min(i, j)  ∈ [0, 1]

    where ``U^i`` holds the top-i right-singular vectors of ``A`` (``A ∈ R^{r×k}``, ``lora_A``'s
    layout, so the vectors live in the layer's input space R^k). φ is 1 when one subspace
    contains the other and 0 when they are orthogonal; ``φ(A1, A2, i, j) = φ(A2, A1, j, i)``.
    Two random subspaces give ``max(i, j) / k`` on average (:func:`random_subspace_similarity`).
    ``1 ≤ i ≤ min(r1, k)``, ``1 ≤ j ≤ min(r2, k)``.
    """
    V1, V2 = _right_singular_vectors(A1, "A1"), _right_singular_vectors(A2, "A2")
    _check_same_space(V1, V2)
    for label, value, limit in (("i", i, V1.shape[1]), ("j", j, V2.shape[1])):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{label} must be an int in [1, {limit}] (the number of singular vectors), got {value!r}")
    overlap = float((V1[:, :i].T @ V2[:, :j]).pow(2).sum())
    return min(1.0, max(0.0, overlap / min(i, j)))  # clipped against rounding only (exact bounds: 0 and 1)


def subspace_similarity_matrix(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """``φ(A1, A2, i, j)`` for every ``i`` and ``j`` at once: entry ``[i-1, j-1]``, a float64
    tensor of shape ``(min(r1, k), min(r2, k))``. ``‖U1^{iᵀ}U2^{j}‖_F²`` is the sum of the
    squared cosines ``(v1_a · v2_b)²`` over ``a ≤ i, b ≤ j``: a 2-D cumulative sum."""
    V1, V2 = _right_singular_vectors(A1, "A1"), _right_singular_vectors(A2, "A2")
    _check_same_space(V1, V2)
    overlap = (V1.T @ V2).pow(2).cumsum(0).cumsum(1)
    i = torch.arange(1, V1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, V2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (overlap / torch.minimum(i, j)).clamp(0.0, 1.0)


def random_subspace_similarity(k: int, i: int, j: int) -> float:
    """The expected φ of an i- and a j-dimensional subspace of R^k drawn independently and
    uniformly: ``E‖U1ᵀU2‖_F² = i·j/k``, so ``φ = max(i, j) / k`` — the level of chance overlap.
    It is small for Hu et al.'s GPT-3 (k = 12288) but not for a layer of width 128."""
    k, i, j = (_positive_int(n, v) for n, v in (("k", k), ("i", i), ("j", j)))
    if max(i, j) > k:
        raise ValueError(f"subspaces of R^{k} have at most {k} dimensions, got i={i}, j={j}")
    return max(i, j) / k


# --- cost ----------------------------------------------------------------------------------------


def optimizer_memory_bytes(model: nn.Module) -> int:
    """Bytes of training state under AdamW, from the model's parameters alone: each trainable
    parameter keeps its weight, its gradient and AdamW's two moments (``exp_avg``,
    ``exp_avg_sq``) — 4 copies, 16 bytes in fp32 — and each frozen one only its weight (4 bytes).

    Activations are not counted: they depend on batch size and sequence length, and LoRA does
    not shrink them (the frozen layers' inputs are still kept for the input gradients). This
    is a model, not a measurement (``benchmarks/`` measures); shared parameters count once.
    """
    total = 0
    for param in model.parameters():
        copies = 4 if param.requires_grad else 1
        total += copies * param.numel() * param.element_size()
    return total


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def comparison_table(
    models: Mapping[str, Mapping], memory: Mapping[str, int], floors: Mapping[str, float] | None = None
) -> str:
    """Markdown: per model (entries of ``results.json``'s ``models``) target and source perplexity,
    the source perplexity's change from ``base`` (forgetting), trainable parameters and their
    share, training time (for ``base``: its pretraining), training-state memory (``memory[name]``,
    from :func:`optimizer_memory_bytes`) and the saved artifact's size."""
    lines = [
        "| model | target ppl | source ppl | Δ source | trainable | share | train s | training state | artifact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if floors:
        lines.append(f"| *entropy floor* | {floors['target']:.3f} | {floors['source']:.3f} | | | | | | |")
    base_source = models["base"]["source_ppl"] if "base" in models else None
    for name, entry in models.items():
        # The base is not fine-tuned: no trainable share or forgetting; its time is its pretraining.
        tuned = name != "base"
        change = f"{entry['source_ppl'] - base_source:+.3f}" if tuned and base_source is not None else "—"
        trainable = f"{entry['trainable_params']:,}" if tuned else "—"
        share = f"{entry['trainable_params'] / entry['total_params']:.2%}" if tuned else "—"
        artifact = "—" if entry.get("artifact_bytes") is None else _bytes(entry["artifact_bytes"])
        lines.append(
            f"| {name} | {entry['target_ppl']:.3f} | {entry['source_ppl']:.3f} | {change} | {trainable} | {share} | "
            f"{entry['train_seconds']:.1f} | {_bytes(memory[name]) if name in memory else '—'} | {artifact} |"
        )
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------

_REFERENCE_STYLES = {"base": "--", "lora": ":", "full": "-."}
#: Short names for the reference models, for the notes in a panel's title.
_SHORT_NAMES = {"base": "base", "lora": "tuned LoRA", "full": "full fine-tuning"}


def _reference_lines(
    ax,
    split: str,
    reference: Mapping[str, Mapping] | None,
    floors,
    data: Sequence[float] | None = None,
    *,
    fit_axis: bool = True,
) -> list[str]:
    """Horizontal lines for the reference models and the entropy floor. Given the plotted
    ``data``, a reference far above it (the base model, whose target perplexity would squash
    every difference the sweep shows) is not drawn: it is returned as a note ("base 47.238")
    for the panel's title instead; with ``fit_axis`` the y-axis is also fitted to the data and
    the lines near it (bar charts keep their zero baseline)."""
    lines = {"entropy floor": (floors[split], "-", "k", "entropy floor")} if floors else {}
    for name, style in _REFERENCE_STYLES.items():
        if reference and name in reference and f"{split}_ppl" in reference[name]:
            value = reference[name][f"{split}_ppl"]
            lines[LABELS.get(name, name)] = (value, style, MODEL_COLORS[name], _SHORT_NAMES[name])
    notes = []
    shown = [v for v in data or () if math.isfinite(v)]  # a run without a source perplexity plots NaN
    if shown:
        near = [value for value, *_ in lines.values() if value <= 1.5 * max(shown)]
        low, high = min(shown + near), max(shown + near)
        if fit_axis:
            ax.set_ylim(low - 0.08 * (high - low), high + 0.08 * (high - low))
    for label, (value, style, color, short) in lines.items():
        if shown and value > high:
            notes.append(f"{short} {value:.3f}")
        else:
            ax.axhline(value, ls=style, color=color, lw=1.2 if color != "k" else 0.8, label=label)
    return notes


def _title(ax, title: str, notes: Sequence[str] = ()) -> None:
    """``title``, with the references drawn above the axis (if any) named under it, wrapped to
    the ~40 characters a panel's width holds at the figures' font size."""
    # No-break spaces inside each note, so a line breaks only between notes, not inside a name.
    note = textwrap.fill("above the axis: " + ", ".join(n.replace(" ", "\u00a0") for n in notes), 40) if notes else ""
    ax.set_title("\n".join(filter(None, (title, note))))


@readable
def plot_rank_sweep(
    runs: Sequence[Mapping],
    reference: Mapping[str, Mapping] | None = None,
    floors: Mapping[str, float] | None = None,
    *,
    others: Mapping[str, Sequence[Mapping]] | None = None,
) -> Figure:
    """Target (left) and source (right) perplexity against the rank (log scale), with the
    reference models of ``reference`` (``results.json``'s ``models``: base, lora, full) as
    horizontal lines and further series ``others`` (``{label: runs}``, e.g. an rsLoRA sweep)
    dashed. Without source perplexities the right panel shows trainable parameters. One legend
    for both panels sits under them."""
    series = {"LoRA, α fixed" if _alpha_fixed(runs) else "LoRA": runs, **(others or {})}
    ranks = sorted({run["rank"] for group in series.values() for run in group})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    has_source = all("source_ppl" in run for group in series.values() for run in group)
    panels = (("target", "target_ppl"), ("source", "source_ppl") if has_source else ("params", "trainable_params"))
    extra_colors = ("#31a354", "#756bb1", "#e377c2")
    for ax, (split, key) in zip(axes, panels):
        for n, (label, group) in enumerate(series.items()):
            group = sorted(group, key=lambda run: run["rank"])
            color, style = (MODEL_COLORS["lora"], "-") if n == 0 else (extra_colors[(n - 1) % 3], "--")
            x, y = [run["rank"] for run in group], [run[key] for run in group]
            ax.plot(x, y, marker="o", ls=style, color=color, label=label)
        if split == "params":
            ax.set(ylabel="parameters", yscale="log")
            _title(ax, "Trainable parameters, r·Σ(d_in + d_out)")
        else:
            notes = _reference_lines(
                ax, split, reference, floors, [run[key] for group in series.values() for run in group]
            )
            ax.set_ylabel("perplexity per character")
            word = "Target perplexity (fine-tuning)" if split == "target" else "Source perplexity (forgetting)"
            _title(ax, word, notes)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
    figure_legend(fig)
    return fig


def _alpha_fixed(runs: Sequence[Mapping]) -> bool:
    return len({run.get("alpha") for run in runs}) == 1 and len(runs) > 1 and not any(r.get("use_rslora") for r in runs)


@readable
def plot_sweep_bars(
    runs: Sequence[Mapping],
    label_key: str,
    reference: Mapping[str, Mapping] | None = None,
    floors: Mapping[str, float] | None = None,
    *,
    xlabel: str | None = None,
) -> Figure:
    """Target and source perplexity of each run as bars labelled by ``run[label_key]``
    (the α sweep, the target-module sweep), with the reference models as lines."""
    labels = [f"{run[label_key]:g}" if isinstance(run[label_key], float) else str(run[label_key]) for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for ax, split in zip(axes, ("target", "source")):
        values = [run.get(f"{split}_ppl", math.nan) for run in runs]
        bars = ax.bar(labels, values, color=MODEL_COLORS["lora"])
        ax.bar_label(bars, fmt="%.3f", padding=2)
        ax.margins(y=0.15)  # headroom for the value labels above the bars
        notes = _reference_lines(ax, split, reference, floors, values, fit_axis=False)
        ax.set(ylabel="perplexity", xlabel=xlabel or label_key)
        _title(ax, f"{split.capitalize()} perplexity per character", notes)
    figure_legend(fig)
    return fig


def _spectra_by_type(deltas: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    spectra: dict[str, list[torch.Tensor]] = {}
    for name, delta in deltas.items():
        spectra.setdefault(layer_type(name), []).append(singular_values(delta))
    return spectra


@readable
def plot_spectrum(
    full_deltas: Mapping[str, torch.Tensor],
    lora_deltas: Mapping[str, torch.Tensor] | None = None,
    *,
    lora_rank: int | None = None,
) -> Figure:
    """Left: the normalised singular values ``σ_i / σ_1`` of full fine-tuning's ``ΔW``, per
    layer type (mean over the blocks; log scale). Right: the energy ``Σ_{j≤k} σ_j² / ‖ΔW‖_F²``
    that the top k directions hold, for full fine-tuning (solid) and LoRA (dashed; it reaches 1
    at k = r). A dotted line marks LoRA's rank. One legend for both panels sits under them."""
    if not full_deltas:
        raise ValueError("plot_spectrum needs at least one full fine-tuning ΔW")
    full = _spectra_by_type(full_deltas)
    lora = _spectra_by_type(lora_deltas) if lora_deltas else {}
    colors = plt.get_cmap("tab10").colors
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for n, (kind, spectra) in enumerate(full.items()):
        color = colors[n % len(colors)]
        size = min(len(s) for s in spectra)
        normalised = torch.stack([(s / s[0] if s[0] > 0 else s)[:size] for s in spectra]).mean(0)
        index = range(1, size + 1)
        left.plot(index, normalised.clamp_min(1e-6), color=color, label=f"{kind} (×{len(spectra)})")
        right.plot(index, torch.stack([_energy_curve(s)[:size] for s in spectra]).mean(0), color=color)
        if kind in lora:
            lsize = min(len(s) for s in lora[kind])
            curve = torch.stack([_energy_curve(s)[:lsize] for s in lora[kind]]).mean(0)
            right.plot(range(1, lsize + 1), curve, "--", color=color)
    if lora_rank is None and lora_deltas:
        # Singular values beyond r are float32 rounding noise (~1e-7 of σ_1): count those above 1e-4·σ_1.
        lora_rank = max(int(torch.linalg.matrix_rank(d.float(), rtol=1e-4)) for d in lora_deltas.values())
    if lora:  # legend keys for the line styles of the right panel
        right.plot([], [], "-", color="k", label="full fine-tuning")
        right.plot([], [], "--", color="k", label="LoRA")
    for ax in (left, right):
        if lora_rank:
            ax.axvline(lora_rank, ls=":", color="k", lw=1, label=f"LoRA rank r = {lora_rank}")
        ax.set_xscale("log")
    left.set(yscale="log", xlabel="index i", ylabel="$σ_i / σ_1$", title="Full fine-tuning: singular values of ΔW")
    right.set(xlabel="number of directions k", ylabel="share of $‖ΔW‖_F^2$", ylim=(0, 1.02))
    right.set_title("Energy in the top k directions")
    figure_legend(fig, ncols=5)
    return fig


def _energy_curve(s: torch.Tensor) -> torch.Tensor:
    power = s.double() ** 2
    total = power.sum()
    return torch.cumsum(power, 0) / total if total > 0 else torch.ones_like(power)


@readable
def plot_subspace_similarity(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, zoom: int = 8, labels: tuple[str, str] = ("r=8", "r=64")
) -> Figure:
    """Hu et al.'s Figure 3: for each named pair ``(A_small, A_large)`` a heatmap of
    ``φ(A_small, A_large, i, j)`` over all i (rows) and j (columns), then the same zoomed to
    ``i, j ≤ zoom``. One shared colour bar (0 to 1)."""
    if not pairs:
        raise ValueError("plot_subspace_similarity needs at least one (A_small, A_large) pair")
    fig, axes = plt.subplots(1, 2 * len(pairs), figsize=(3 * 2 * len(pairs), 3.4), layout="constrained")
    image = None
    for n, (name, (small, large)) in enumerate(pairs.items()):
        phi = subspace_similarity_matrix(small, large).numpy()
        for ax, part, title in (
            (axes[2 * n], phi, name),
            (axes[2 * n + 1], phi[:zoom, :zoom], f"{name}, i, j ≤ {zoom}"),
        ):
            image = ax.imshow(part, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            rows, cols = part.shape
            ax.set_yticks(range(rows), [str(i + 1) if rows <= 8 or (i + 1) % 2 == 0 else "" for i in range(rows)])
            step = max(1, cols // 8)
            ax.set_xticks(range(step - 1, cols, step), [str(j + 1) for j in range(step - 1, cols, step)])
            ax.set(title=title, xlabel=f"j ({labels[1]})", ylabel=f"i ({labels[0]})")
            ax.tick_params(labelsize=12)  # up to 9 labels on each 2.4-in heatmap
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="φ")
    return fig


# --- outputs for the companion PDF ----------------------------------------------------------------

_SWEEP_KEYS = ("rank", "alpha", "scaling", "lr", "epochs", "use_rslora", "trainable_params", "target_ppl", "source_ppl")


def _check_runs(runs: Sequence[Mapping]) -> None:
    problems = []
    if not runs:
        raise ValueError("write_sweep_outputs needs at least one sweep run")
    for n, run in enumerate(runs):
        rank = run.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"runs[{n}].rank must be a positive int, got {rank!r}")
        for key in ("target_ppl", "source_ppl"):
            if key in run or key == "target_ppl":
                value = run.get(key)
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not (math.isfinite(value) and value >= 1)
                ):
                    problems.append(f"runs[{n}].{key} must be a finite perplexity >= 1, got {value!r}")
    ranks = [run.get("rank") for run in runs]
    if len(set(map(repr, ranks))) != len(ranks):
        problems.append(f"each rank may appear only once, got {ranks}")
    if problems:
        raise ValueError("cannot write the sweep: " + "; ".join(problems) + " (was the sweep trained to completion?)")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    return buffer.getvalue()


#: The files :func:`write_sweep_outputs` may write into a run folder.
SWEEP_FILES = ("sweep.json", "rank_sweep.png", "spectrum.png")


def write_sweep_outputs(
    run_dir: str | os.PathLike,
    runs: Sequence[Mapping],
    *,
    full_deltas: Mapping[str, torch.Tensor] | None = None,
    lora_deltas: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, Mapping] | None = None,
    floors: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write the rank sweep into ``run_dir`` for ``paper/build.py``: ``sweep.json``
    (``{"runs": [{"rank", "alpha", "scaling", "lr", "epochs", "use_rslora", "trainable_params",
    "target_ppl", "source_ppl"}, ...]}``, sorted by rank), ``rank_sweep.png`` and, given
    ``full_deltas``, ``spectrum.png``. ``reference`` is ``results.json``'s ``models``.

    Everything is checked and rendered in memory first and each file is then written atomically,
    so bad input leaves the folder unchanged. Returns the written paths by file name.
    """
    _check_runs(runs)
    ordered = sorted(runs, key=lambda run: run["rank"])
    sweep = {"runs": [{key: run[key] for key in _SWEEP_KEYS if key in run} for run in ordered]}
    text = json.dumps(sweep, indent=2, allow_nan=False) + "\n"
    files = {"rank_sweep.png": _png(plot_rank_sweep(ordered, reference, floors))}
    if full_deltas:
        files["spectrum.png"] = _png(plot_spectrum(full_deltas, lora_deltas))
    files["sweep.json"] = text.encode("utf-8")
    run_dir = Path(run_dir)
    written = {}
    for name, data in files.items():
        with atomic_path(run_dir / name) as tmp:
            tmp.write_bytes(data)
        written[name] = run_dir / name
    return written


def analyse_run(
    exp: Experiment,
    base: nn.Module,
    full: nn.Module,
    lora: nn.Module,
    run_dir: str | os.PathLike,
    *,
    reference: Mapping[str, Mapping] | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, Path]:
    """The main job's hook: run :func:`rank_sweep` and write its outputs with the spectra of
    ``full``'s and ``lora``'s updates (:func:`write_sweep_outputs`)."""
    runs = rank_sweep(exp, base, ranks)
    return write_sweep_outputs(
        run_dir,
        runs,
        full_deltas=delta_weights(base, full),
        lora_deltas=delta_weights(base, lora),
        reference=reference,
        floors=entropy_floors(exp),
    )
