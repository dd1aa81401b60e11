"""Sweeps: LoRA variants of the tuned recipe, trained and measured one after another.

:func:`rank_sweep`, :func:`alpha_sweep` and :func:`target_sweep` change one setting of the
profile's tuned recipe (``lora``) at a time, train each variant through
:func:`~lora_lab.experiment.stages.lora_finetuned` (cached per recipe) and measure its
held-out perplexity. They train :data:`SWEEP_EPOCHS` epochs per run, fewer than the main
recipes, so that a dozen runs fit in a few minutes on two CPU cores: a sweep compares recipes
at one equal, short budget, not at convergence.

:func:`write_sweep_outputs` writes ``sweep.json``, ``rank_sweep.png`` and ``spectrum.png`` into
a run folder for the companion PDF (``paper/build.py``); :func:`analyse_run` runs the rank
sweep and writes them in one call.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..experiment.config import TUNED_RECIPE, LoRARecipe
from ..experiment.stages import Experiment, TrainedModel, entropy_floors, lora_finetuned
from ..files import atomic_path, json_text
from ..lora import count_parameters, find_target_modules, lora_modules
from ..training import perplexity
from ..validation import check_positive_int, check_positive_real
from ._entries import ModelEntry
from .figures import plot_rank_sweep, plot_spectrum
from .low_rank import delta_weights, spectrum_summary

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
    "SWEEP_FILES",
    "write_sweep_outputs",
    "analyse_run",
]

#: Epochs per sweep run. The main recipes train ``profile.finetune.epochs`` (30 on the cpu
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
#: layer ``lm_head`` included, as the course's recipe does.
TARGET_GROUPS: dict[str, tuple[str, ...] | None] = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("up", "down"),
    "all": None,
}


# --- sweeps ----------------------------------------------------------------------------------


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
    """The tuned recipe (``exp.profile.recipe("lora")``) with the given settings replaced, trained
    for ``epochs`` (default: :data:`SWEEP_EPOCHS`, or the profile's ``finetune.epochs`` if that
    is fewer). The recipe's ``name`` only labels the run: equal settings reuse one cached artifact."""
    tuned = exp.profile.recipe(TUNED_RECIPE)
    if epochs is None:
        epochs = min(SWEEP_EPOCHS, exp.profile.finetune.epochs)
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of module names or None, got the string {target_modules!r}")
    return LoRARecipe(  # which checks every setting
        name=name,
        rank=tuned.rank if rank is None else rank,
        alpha=tuned.alpha if alpha is None else alpha,
        lr=tuned.lr if lr is None else lr,
        target_modules=tuple(target_modules) if target_modules else None,
        epochs=epochs,
        use_rslora=bool(use_rslora),
    )


def run_sweep(exp: Experiment, base: TrainedModel, recipes: Sequence[LoRARecipe], *, source: bool = True) -> list[dict]:
    """Train (or load from the cache) one LoRA model of ``base`` per recipe and measure it.

    Returns one dict per recipe, in order: ``name, rank, alpha, scaling, lr, epochs,
    target_modules, use_rslora, target_ppl, source_ppl`` (only with ``source=True``),
    ``trainable_params, total_params, train_seconds, steps``. Perplexities are exact over the
    whole validation splits (:func:`lora_lab.training.perplexity`, no sampling);
    ``train_seconds`` is the wall-clock time of the run that made the cached artifact.
    """
    names = [recipe.name for recipe in recipes]
    if not names:
        raise ValueError("a sweep needs at least one recipe")
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique within a sweep (they label the runs), got {names}")
    for recipe in recipes:  # a bad target list fails here, before any run has trained
        find_target_modules(base.model, list(recipe.target_modules) if recipe.target_modules else None)
    block = exp.profile.model.block_size
    runs = []
    for recipe in recipes:
        trained = lora_finetuned(exp, base, recipe)
        model, history = trained.model, trained.history
        trainable, total = count_parameters(model)
        layer = next(iter(lora_modules(model).values())).lora
        entry = {
            "name": recipe.name,
            "rank": recipe.rank,
            "alpha": recipe.alpha,
            "scaling": layer.scaling,
            "lr": recipe.lr,
            "epochs": recipe.epochs if recipe.epochs is not None else exp.profile.finetune.epochs,
            "target_modules": list(recipe.target_modules) if recipe.target_modules else None,
            "use_rslora": recipe.use_rslora,
            "target_ppl": perplexity(model, exp.splits.target_val, block, device=exp.device),
        }
        if source:
            entry["source_ppl"] = perplexity(model, exp.splits.source_val, block, device=exp.device)
        entry.update(trainable_params=trainable, total_params=total, train_seconds=history.seconds, steps=history.steps)
        runs.append(entry)
        del trained, model  # one model at a time: a sweep's memory does not grow with its length
    return runs


def rank_sweep(
    exp: Experiment,
    base: TrainedModel,
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
    ranks = [check_positive_int("rank", r) for r in ranks]
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
    base: TrainedModel,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    rank: int | None = None,
    lr: float | None = None,
    epochs: float | None = None,
    source: bool = True,
) -> list[dict]:
    """The tuned recipe (default rank: the tuned one) at each α in ``alphas``: the same model
    and learning rate, only the scaling ``α / r`` of the update changes."""
    alphas = [check_positive_real("alpha", a) for a in alphas]
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"each alpha may appear only once, got {alphas}")
    recipes = [sweep_recipe(exp, f"sweep_alpha{a:g}", rank=rank, alpha=a, lr=lr, epochs=epochs) for a in alphas]
    return run_sweep(exp, base, recipes, source=source)


def target_sweep(
    exp: Experiment,
    base: TrainedModel,
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


# --- outputs for the companion PDF ----------------------------------------------------------------

_SWEEP_KEYS = ("rank", "alpha", "scaling", "lr", "epochs", "use_rslora", "trainable_params", "target_ppl", "source_ppl")


def _check_runs(runs: Sequence[Mapping]) -> None:
    """Every problem with ``runs`` at once, so that one failed run names all it got wrong."""
    problems = []
    if not runs:
        raise ValueError("write_sweep_outputs needs at least one sweep run")
    for n, run in enumerate(runs):
        rank = run.get("rank")
        # Plain ints only (no NumPy integers, as check_positive_int allows): sweep.json is written as given.
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
    reference: Mapping[str, ModelEntry] | None = None,
    floors: Mapping[str, float] | None = None,
    lora_rank: int | None = None,
) -> dict[str, Path]:
    """Write the rank sweep into ``run_dir`` for ``paper/build.py``: ``sweep.json``
    (``{"runs": [{"rank", "alpha", "scaling", "lr", "epochs", "use_rslora", "trainable_params",
    "target_ppl", "source_ppl"}, ...]}``, sorted by rank), ``rank_sweep.png`` and, given
    ``full_deltas``, ``spectrum.png``. ``reference`` is the run's measured models
    (``RunResults.models``, or ``results.json``'s ``models``). Given ``full_deltas``,
    ``lora_deltas`` and the LoRA run's ``lora_rank`` too, ``sweep.json`` also holds
    ``"spectrum": {"rank": r, "by_layer_type": ...}`` (:func:`~lora_lab.analysis.low_rank.spectrum_summary`),
    the figure's numbers.

    Everything is checked and rendered in memory first and each file is then written atomically,
    so bad input leaves the folder unchanged. Returns the written paths by file name.
    """
    _check_runs(runs)
    ordered = sorted(runs, key=lambda run: run["rank"])
    sweep: dict[str, object] = {"runs": [{key: run[key] for key in _SWEEP_KEYS if key in run} for run in ordered]}
    if full_deltas and lora_deltas and lora_rank:
        sweep["spectrum"] = {"rank": lora_rank, "by_layer_type": spectrum_summary(full_deltas, lora_deltas, lora_rank)}
    text = json_text(sweep)
    files = {"rank_sweep.png": _png(plot_rank_sweep(ordered, reference, floors, lora_rank=lora_rank))}
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
    base: TrainedModel,
    full: TrainedModel,
    lora: TrainedModel,
    run_dir: str | os.PathLike,
    *,
    reference: Mapping[str, ModelEntry] | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, Path]:
    """The main job's hook: run :func:`rank_sweep` and write its outputs with the spectra of
    ``full``'s and ``lora``'s updates (:func:`write_sweep_outputs`)."""
    runs = rank_sweep(exp, base, ranks)
    return write_sweep_outputs(
        run_dir,
        runs,
        full_deltas=delta_weights(base.model, full.model),
        lora_deltas=delta_weights(base.model, lora.model),
        reference=reference,
        floors=entropy_floors(exp),
        lora_rank=exp.profile.recipe(TUNED_RECIPE).rank,
    )
