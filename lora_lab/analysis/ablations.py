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
import json
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
    "read_lr_selection",
    "lr_table",
    "plot_lr_frontier",
    "recipe_ablation",
    "rslora_comparison",
    "budget_matched_targets",
]

#: One grid for every method: half-decades from 3e-4 to 3e-2, around both methods' usual learning rates.
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


def read_lr_selection(text: str, where: str = "lr_selection.json") -> dict:
    """The file ``lora-lab run --select-lr`` writes: ``{"corpus", "profile", "seed", "runs", "table"}``
    with :func:`lr_sweep`'s runs, checked (every problem named, with what to do)."""
    hint = "write it again with `lora-lab run --select-lr`"
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where} is not JSON ({error}); {hint}") from None
    missing = [key for key in ("corpus", "profile", "seed", "runs") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{where} lacks {missing}; {hint}")
    problems = []
    keys = {"method", "lr", "steps", "target_ppl", "source_ppl", "diverged"}
    for i, run in enumerate(data["runs"] if isinstance(data["runs"], list) else [None]):
        if not isinstance(run, dict) or not keys <= set(run):
            problems.append(f"runs[{i}] is not a run of lr_sweep")
        elif not run["diverged"] and not all(isinstance(run[k], (int, float)) and math.isfinite(run[k]) and run[k] >= 1
                                             for k in ("target_ppl", "source_ppl")):  # fmt: skip
            problems.append(f"runs[{i}] ({run['method']}, lr {run['lr']}): perplexities must be finite and ≥ 1")
    if problems or not data["runs"]:
        raise ValueError(f"{where}: {'; '.join(problems) or 'no runs'}; {hint}")
    return data


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


def plot_lr_frontier(runs: Sequence[Mapping], floors: Mapping[str, float] | None = None):
    """What each learning rate of :func:`lr_sweep` bought and cost: target perplexity (learning)
    against source perplexity (forgetting), one line per method through its learning rates, each
    point labelled with its lr and the chosen one (lowest target perplexity) ringed. A method whose
    line lies to the left of another's forgets less at the same target perplexity."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from .figures import LABELS, MODEL_COLORS, figure_legend, readable

    @readable
    def draw():
        fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
        for n, method in enumerate(dict.fromkeys(run["method"] for run in runs)):
            done = sorted((r for r in runs if r["method"] == method and not r["diverged"]), key=lambda r: r["lr"])
            color = MODEL_COLORS.get(method, f"C{n}")
            label = f"{LABELS.get(method, method)}: lr {done[0]['lr']:g} to {done[-1]['lr']:g}"
            ax.plot([r["source_ppl"] for r in done], [r["target_ppl"] for r in done], marker="o", color=color,
                    label=label)  # fmt: skip
            chosen = best_lr(done)
            offset = (6, 7) if n % 2 == 0 else (6, -17)  # one method's labels above its points, the other's below
            for r in done:
                ax.annotate(f"{r['lr']:g}", (r["source_ppl"], r["target_ppl"]), xytext=offset,
                            textcoords="offset points", fontsize=12, color=color)  # fmt: skip
                if r["lr"] == chosen:
                    ax.scatter([r["source_ppl"]], [r["target_ppl"]], s=300, facecolors="none", edgecolors=color, lw=2)
        if floors:
            ax.axhline(floors["target"], color="k", lw=0.8, label="target entropy floor")
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.12)  # room for the labels at the ends
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if round(x) in (2, 3, 5, 7, 20, 30) else ""))
        ax.set(xlabel="source perplexity (forgetting →, log scale)", ylabel="target perplexity (← learning)",
               title="Each learning rate: what it learned, what it forgot (ringed: chosen)")  # fmt: skip
        figure_legend(fig, ncols=2)
        return fig

    return draw()


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
