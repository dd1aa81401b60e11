"""``lora-lab run``, the main job: pretrain → LoRA (each recipe) → full fine-tuning → compare.

The data path is a straight line: :func:`prepare` gives an :class:`Experiment`; each stage
returns a :class:`TrainedModel`; :func:`evaluate` turns each into a :class:`ModelResult`; they
are gathered in one :class:`RunResults`, whose claims are checked by :func:`claims`, and
:func:`lora_lab.experiment.report.write_outputs` writes ``results.json``, ``report.md`` and the
figures into the output folder.

With ``seeds=N`` the comparison is trained once per seed (:mod:`lora_lab.experiment.seeds`: the
corpus is drawn once, the training seeds vary), every seed's stages cached as a one-seed run's
are; ``results.json`` then lists the seeds and every model's values over them, and the claims are
judged on those ranges.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..analysis.ablations import lr_table, select_lrs
from ..analysis.sweeps import SWEEP_FILES, analyse_run
from ..files import atomic_write_text, json_text
from ..runtime import machine_description
from ..training import distributed
from .config import TUNED_RECIPE
from .report import write_outputs
from .results import ModelResult, RunResults
from .seeds import seed_experiment, seed_list, spreads
from .stages import (
    Experiment,
    TrainedModel,
    entropy_floors,
    evaluate,
    full_finetuned,
    lora_finetuned,
    prepare,
    pretrained_base,
)

__all__ = ["run", "claims", "LR_SELECTION_FILE"]

#: What ``select_lr=True`` writes next to results.json: every run of its learning-rate sweeps.
LR_SELECTION_FILE = "lr_selection.json"


def run(
    corpus: str = "builtin",
    profile: str = "cpu",
    out: str | os.PathLike = "runs/latest",
    *,
    overrides: Mapping[str, object] | None = None,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    sweep: bool = False,
    seeds: int = 1,
    select_lr: bool = False,
) -> RunResults:
    """Run the whole comparison, write its artifacts into ``out`` and return its results.

    The models are ``base``, one per recipe of the profile (``lora_course`` is the course's
    r=4, α=1, lr 1e-3; ``lora`` the tuned recipe) and ``full``. With ``sweep=True`` it also runs
    the rank sweep and writes ``sweep.json``, ``rank_sweep.png`` and ``spectrum.png``
    (:func:`lora_lab.analysis.sweeps.analyse_run`; the companion PDF uses them); without it, those
    files left in ``out`` by an earlier run are removed, since they would not describe these
    results. An ``out`` that is a file is refused before training.

    ``seeds`` trains the comparison once per seed, from the profile's ``seed`` on (the default,
    1, is the one-seed run; 3 gives seeds 0, 1, 2 on the default profile). ``models``,
    ``histories``, the samples and the sweep are the first seed's.

    ``select_lr=True`` first picks each method's learning rate (every recipe's and full
    fine-tuning's) by the lowest target validation perplexity over one grid
    (:func:`lora_lab.analysis.ablations.select_lrs`, with the first seed), runs the comparison
    with those, and writes the sweep's runs to ``lr_selection.json``. With
    ``--set finetune.keep_best=true`` each fine-tuning also keeps its best-validation checkpoint:
    together, the fair setting for real text, where no recipe was tuned beforehand.

    Under ``torchrun`` every rank trains (:mod:`lora_lab.training.distributed`); rank 0 alone
    evaluates and writes ``out``, and the other ranks return the results it wrote. The rank
    sweep and the learning-rate selection run in one process.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # found now, not after the training
        raise NotADirectoryError(f"the output folder {out} is a file; pass a folder with --out (it is created)")
    world = distributed.current()
    if (sweep or select_lr) and world.world_size > 1:
        option = "--sweep" if sweep else "--select-lr"
        raise ValueError(f"{option} runs in one process; run it without torchrun (a plain run trains and caches "
                         "its own models: those of several processes are cached apart, their last bits differ)")
    exp = prepare(corpus, profile, overrides=overrides, device=device, cache=cache, progress=progress)
    seed_values = seed_list(exp.profile.seed, seeds)
    lr_runs = None
    if select_lr:
        exp, lr_runs = select_lrs(exp, pretrained_base(exp))
    trained = _train_all(exp)
    if not world.is_main:
        for seed in seed_values[1:]:  # every rank trains every seed; rank 0 measures them
            _train_all(seed_experiment(exp, seed))
        world.barrier()  # rank 0 evaluates and writes the results
        return RunResults.from_json((out / "results.json").read_text(encoding="utf-8"), where=str(out / "results.json"))
    measured = _measure(exp, trained)
    per_seed = [measured]
    for seed in seed_values[1:]:  # one seed's models at a time: memory does not grow with the seeds
        seeded = seed_experiment(exp, seed)
        per_seed.append(_measure(seeded, _train_all(seeded)))
    results = RunResults(
        corpus=exp.corpus.name,
        profile=exp.profile.name,
        entropy_floor_ppl=entropy_floors(exp),
        models=measured,
        seeds=seed_values,
        across_seeds=spreads(per_seed) if len(per_seed) > 1 else {},
        recipes={recipe.name: recipe.to_dict() for recipe in exp.profile.recipes},
        profile_settings=exp.profile.to_dict(),
        corpus_sha256=exp.corpus.sha256,
        split_sizes=exp.splits.sizes(),
        machine=machine_description(),
        world_size=world.world_size,
        histories={model.name: model.history for model in trained},
    )
    results.claims = claims(results)
    if sweep:
        by_name = {model.name: model for model in trained}
        analyse_run(exp, by_name["base"], by_name["full"], by_name[TUNED_RECIPE], out, reference=results.models)
    else:  # an earlier run's sweep would otherwise sit next to these results, and the PDF would quote it
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
    write_outputs(exp.profile, results, out)
    if lr_runs is not None:
        selection = {"corpus": exp.corpus.name, "profile": exp.profile.name, "seed": exp.profile.seed,
                     "runs": lr_runs, "table": lr_table(lr_runs)}  # fmt: skip
        atomic_write_text(out / LR_SELECTION_FILE, json_text(selection))
    else:  # an earlier run's selection would not describe these results
        (out / LR_SELECTION_FILE).unlink(missing_ok=True)
    world.barrier()
    return results


def _train_all(exp: Experiment) -> list[TrainedModel]:
    """One seed's models: base, every recipe, full fine-tuning, trained (or loaded from the cache)."""
    base = pretrained_base(exp)
    return [base, *(lora_finetuned(exp, base, recipe) for recipe in exp.profile.recipes), full_finetuned(exp, base)]


def _measure(exp: Experiment, trained: list[TrainedModel]) -> dict[str, ModelResult]:
    """One seed's measurements (rank 0 alone, under torchrun)."""
    return {model.name: evaluate(exp, model) for model in trained}


def claims(results: RunResults) -> dict[str, bool]:
    """The comparison's claims, each true or false (the cpu profile must make them all true on
    the built-in corpus; README reports them).

    Each claim is judged at the unfavourable end of every range over the seeds
    (:meth:`RunResults.seed_table`): "LoRA forgets less than full fine-tuning" holds only if
    LoRA's highest source perplexity is below full fine-tuning's lowest, so a difference inside
    the spread is no claim. With one seed every range is a single value and this is the plain
    comparison.
    """

    def low(name: str, metric: str) -> float:
        return results.spread(name, metric).low

    def high(name: str, metric: str) -> float:
        return results.spread(name, metric).high

    lora, target, source = TUNED_RECIPE, "target_ppl", "source_ppl"
    worst_gap = high("base", target) - low("full", target)
    checked = {
        "lora_beats_base_on_target": results.spread(lora, target).below(results.spread("base", target)),
        "lora_within_10pct_of_full": high(lora, target) <= 1.10 * low("full", target),
        "lora_closes_70pct_of_gap": low("base", target) > high("full", target)
        and (low("base", target) - high(lora, target)) >= 0.70 * worst_gap,
        "lora_forgets_less_than_full": results.spread(lora, source).below(results.spread("full", source)),
    }
    floors = results.entropy_floor_ppl
    if floors:
        validity = results.seed_table()[lora].get("valid_target_rate")
        checked["lora_samples_80pct_valid"] = validity is not None and validity.low >= 0.80
        checked["no_model_below_floor"] = all(
            low(name, target) >= floors["target"] and low(name, source) >= floors["source"] for name in results.models
        )
    return checked
