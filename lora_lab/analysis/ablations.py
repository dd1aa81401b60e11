"""Fair comparisons: each method's learning rate from one sweep, the tuned recipe taken apart, rsLoRA
at a matched step, and target modules at an equal parameter budget.

Every run goes through the cached stages (:func:`~lora_lab.experiment.stages.lora_finetuned`,
:func:`~lora_lab.experiment.stages.full_finetuned`), so a rerun or a notebook reuses them. Unlike
:mod:`lora_lab.analysis.sweeps`, whose runs are short on purpose, these train to the headline
budget (the profile's ``finetune.epochs``) unless ``epochs`` says otherwise: their conclusions are
about the recipes the main job compares.

* :func:`lr_sweep` — a LoRA recipe or full fine-tuning at each learning rate of one grid;
  :func:`best_lr` picks the lowest target validation perplexity. The same grid and the same
  budget for every method, so none is judged at a learning rate tuned for another.
  :func:`select_lrs` does it for every method of the main job (``lora-lab run --select-lr``).
* :func:`recipe_ablation` — the course's recipe with only its lr, only its α, or only its r set
  to the tuned recipe's: which change does the work.
* :func:`rslora_comparison` — LoRA (α fixed) and rsLoRA (scaling α/√r) at several ranks, with
  rsLoRA's α chosen so that both take the same step at the tuned recipe's rank.
* :func:`budget_matched_targets` — adapters on different sets of layers with the rank of each set
  chosen so that all train about the same number of parameters (Hu et al.'s Table 5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from ..experiment.config import COURSE_RECIPE, TUNED_RECIPE, LoRARecipe, with_overrides
from ..experiment.stages import Experiment, TrainedModel, full_finetuned
from ..lora import apply_lora_to_model, count_parameters
from ..training import perplexity
from ..validation import check_positive_real
from .sweeps import run_sweep, sweep_recipe

__all__ = [
    "LR_GRID",
    "BUDGET_GROUPS",
    "lr_sweep",
    "best_lr",
    "select_lrs",
    "lr_table",
    "recipe_ablation",
    "rslora_comparison",
    "budget_matched_targets",
]

#: One grid for every method: half-decades around both tuned learning rates (LoRA 1e-2, full 2e-3).
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

#: Sets of layers for the budget-matched comparison, as in Hu et al.'s Table 5 (one attention
#: matrix, two, all four) plus the MLP and every linear layer.
BUDGET_GROUPS: dict[str, tuple[str, ...] | None] = {
    "q": ("q",),
    "v": ("v",),
    "q,v": ("q", "v"),
    "q,k,v,o": ("q", "k", "v", "o"),
    "mlp": ("up", "down"),
    "all": None,
}


def _budget(exp: Experiment, epochs: float | None) -> float:
    return exp.profile.finetune.epochs if epochs is None else check_positive_real("epochs", epochs)


def _at(exp: Experiment, recipe: LoRARecipe, epochs: float) -> LoRARecipe:
    """``recipe`` trained for ``epochs``, written as the main job writes it when that is the
    headline budget (``epochs=None``), so that equal settings share one cached artifact."""
    return dataclasses.replace(recipe, epochs=None if epochs == exp.profile.finetune.epochs else epochs)


def lr_sweep(
    exp: Experiment,
    base: TrainedModel,
    method: str,
    lrs: Sequence[float] = LR_GRID,
    *,
    epochs: float | None = None,
) -> list[dict]:
    """Fine-tune ``base`` with ``method`` (``"full"``: every weight; else the name of one of the
    profile's LoRA recipes, e.g. ``"lora"``, the tuned one) at each learning rate in ``lrs`` for
    ``epochs`` (default: the recipe's own, else the headline budget) and measure it.

    Returns one dict per lr: ``method, lr, epochs, steps, target_ppl, source_ppl, diverged``. A run
    whose loss became NaN or infinite, or whose perplexity overflows, is kept as ``diverged: True``
    with null perplexities, so a grid may reach past the stable range."""
    recipe = None if method == "full" else exp.profile.recipe(method)  # an unknown name: a clear error
    lrs = [check_positive_real("lr", lr) for lr in lrs]
    if not lrs or len(set(lrs)) != len(lrs):
        raise ValueError(f"lr_sweep needs distinct learning rates, got {lrs}")
    epochs = _budget(exp, recipe.epochs if recipe is not None and epochs is None else epochs)
    block = exp.profile.model.block_size
    runs = []
    for lr in lrs:
        entry: dict = {"method": method, "lr": lr, "epochs": epochs}
        try:
            if recipe is not None:
                at_lr = dataclasses.replace(recipe, name=f"lr_{method}_{lr:g}", lr=lr)
                trained = run_sweep(exp, base, [_at(exp, at_lr, epochs)])[0]
                entry.update(steps=trained["steps"], target_ppl=trained["target_ppl"],
                             source_ppl=trained["source_ppl"], diverged=False)  # fmt: skip
            else:
                at_lr = dataclasses.replace(
                    exp, profile=with_overrides(exp.profile, {"full.lr": lr, "finetune.epochs": epochs})
                )
                model = full_finetuned(at_lr, base)
                entry.update(
                    steps=model.history.steps,
                    target_ppl=perplexity(model.model, exp.splits.target_val, block, device=exp.device),
                    source_ppl=perplexity(model.model, exp.splits.source_val, block, device=exp.device),
                    diverged=False,
                )
                del model
        # The loop's error for a non-finite loss, or a model so far off that exp(loss) overflows: this
        # lr is past the stable range.
        except (FloatingPointError, OverflowError):
            entry.update(steps=None, target_ppl=None, source_ppl=None, diverged=True)
        runs.append(entry)
    return runs


def best_lr(runs: Sequence[Mapping]) -> float:
    """The learning rate of :func:`lr_sweep`'s run with the lowest target validation perplexity."""
    finished = [run for run in runs if not run.get("diverged") and run.get("target_ppl") is not None]
    if not finished:
        raise ValueError("every run of the learning-rate sweep diverged; try smaller learning rates")
    return min(finished, key=lambda run: run["target_ppl"])["lr"]


def select_lrs(
    exp: Experiment, base: TrainedModel, lrs: Sequence[float] = LR_GRID
) -> tuple[Experiment, list[dict]]:
    """Each method of the main job (every LoRA recipe, and full fine-tuning) at the learning rate
    of :data:`LR_GRID` (or ``lrs``) with the lowest target validation perplexity, each at its own
    budget: ``exp`` with those learning rates, and every sweep run (for the record)."""
    runs, chosen = [], {}
    for method in [*(recipe.name for recipe in exp.profile.recipes), "full"]:
        sweep = lr_sweep(exp, base, method, lrs)
        runs += sweep
        chosen["full.lr" if method == "full" else f"recipes.{method}.lr"] = best_lr(sweep)
    return dataclasses.replace(exp, profile=with_overrides(exp.profile, chosen)), runs


def lr_table(runs: Sequence[Mapping]) -> str:
    """:func:`lr_sweep`'s runs (one method or several) as a Markdown table, best lr per method marked."""
    lines = ["| method | lr | steps | target ppl | source ppl |", "|---|---:|---:|---:|---:|"]
    best = {m: best_lr([r for r in runs if r["method"] == m]) for m in dict.fromkeys(r["method"] for r in runs)}
    for run in runs:
        mark = " ←" if run["lr"] == best[run["method"]] else ""
        if run["diverged"]:
            lines.append(f"| {run['method']} | {run['lr']:g} | — | diverged | — |")
        else:
            lines.append(f"| {run['method']} | {run['lr']:g}{mark} | {run['steps']} | {run['target_ppl']:.3f} | "
                         f"{run['source_ppl']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def recipe_ablation(exp: Experiment, base: TrainedModel, *, epochs: float | None = None) -> list[dict]:
    """The course's recipe, the tuned one, and three runs between them that each change one
    setting of the course's recipe to the tuned value: only lr, only α, only r (the rank alone
    also shrinks the scaling α/r). Returns :func:`~lora_lab.analysis.sweeps.run_sweep`'s entries
    with a ``"changed"`` key (``"none"``, ``"lr"``, ``"alpha"``, ``"rank"``, ``"all"``)."""
    course, tuned = exp.profile.recipe(COURSE_RECIPE), exp.profile.recipe(TUNED_RECIPE)
    epochs = _budget(exp, epochs)
    variants = {
        "none": course,
        "lr": dataclasses.replace(course, name="course_lr", lr=tuned.lr),
        "alpha": dataclasses.replace(course, name="course_alpha", alpha=tuned.alpha),
        "rank": dataclasses.replace(course, name="course_rank", rank=tuned.rank),
        "all": tuned,
    }
    runs = run_sweep(exp, base, [_at(exp, recipe, epochs) for recipe in variants.values()])
    for changed, entry in zip(variants, runs):
        entry["changed"] = changed
    return runs


def rslora_comparison(
    exp: Experiment, base: TrainedModel, ranks: Sequence[int] = (4, 16, 64), *, epochs: float | None = None
) -> list[dict]:
    """The tuned recipe at each rank with LoRA's scaling α/r (α fixed) and with rsLoRA's α'/√r,
    where α' = α/√r₀ at the tuned rank r₀: both take the same step at r₀, so what differs at other
    ranks is how the scaling follows r. Entries as :func:`run_sweep`'s, with ``"effective_step"``:
    scaling·r·lr, the quantity the update's growth follows across ranks
    (:mod:`lora_lab.analysis.update_speed`)."""
    tuned = exp.profile.recipe(TUNED_RECIPE)
    epochs = _budget(exp, epochs)
    rs_alpha = tuned.alpha / math.sqrt(tuned.rank)
    recipes = []
    for r in ranks:
        recipes.append(sweep_recipe(exp, f"cmp_r{r}", rank=r, epochs=epochs))
        recipes.append(sweep_recipe(exp, f"cmp_r{r}_rslora", rank=r, alpha=rs_alpha, use_rslora=True, epochs=epochs))
    runs = run_sweep(exp, base, [_at(exp, recipe, epochs) for recipe in recipes])
    for entry in runs:
        entry["effective_step"] = entry["scaling"] * entry["rank"] * entry["lr"]
    return runs


def budget_matched_targets(
    exp: Experiment,
    base: TrainedModel,
    groups: Mapping[str, Sequence[str] | None] = BUDGET_GROUPS,
    *,
    budget: int | None = None,
    epochs: float | None = None,
) -> list[dict]:
    """Adapters on each group of layers, each group's rank chosen so that it trains about
    ``budget`` parameters (default: the tuned rank on the first group), α and lr the tuned
    recipe's. Ranks are whole numbers, so the budgets match to within one rank's worth; each
    entry (as :func:`run_sweep`'s) reports its exact ``trainable_params`` and its ``"group"``."""
    if not groups:
        raise ValueError("budget_matched_targets needs at least one group of target modules")
    tuned = exp.profile.recipe(TUNED_RECIPE)
    per_rank = {}
    for label, targets in groups.items():  # parameters per unit of rank: a rank-1 copy's count
        probe = apply_lora_to_model(base.model, rank=1, alpha=1.0, target_modules=list(targets) if targets else None)
        per_rank[label] = count_parameters(probe)[0]
        del probe
    if budget is None:
        budget = tuned.rank * next(iter(per_rank.values()))
    budget = int(check_positive_real("budget", budget))
    epochs = _budget(exp, epochs)
    recipes = [
        _at(exp, sweep_recipe(exp, f"budget_{label.replace(',', '')}", rank=max(1, round(budget / per_rank[label])),
                              target_modules=targets, epochs=epochs), epochs)  # fmt: skip
        for label, targets in groups.items()
    ]
    runs = run_sweep(exp, base, recipes)
    for label, entry in zip(groups, runs):
        entry["group"], entry["budget"] = label, budget
    return runs
