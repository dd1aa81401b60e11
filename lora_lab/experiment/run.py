"""``lora-lab run``, the main job: pretrain → LoRA (each recipe) → full fine-tuning → compare.

The data path is a straight line: :func:`prepare` gives an :class:`Experiment`; each stage
returns a :class:`TrainedModel`; :func:`evaluate` turns each into a :class:`ModelResult`; they
are gathered in one :class:`RunResults`, whose claims are checked by :func:`claims`, and
:func:`lora_lab.experiment.report.write_outputs` writes ``results.json``, ``report.md`` and the
figures into the output folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..analysis.sweeps import SWEEP_FILES, analyse_run
from ..runtime import machine_description
from ..training import distributed
from .config import TUNED_RECIPE
from .report import write_outputs
from .results import RunResults
from .stages import entropy_floors, evaluate, full_finetuned, lora_finetuned, prepare, pretrained_base

__all__ = ["run", "claims"]


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
) -> RunResults:
    """Run the whole comparison, write its artifacts into ``out`` and return its results.

    The models are ``base``, one per recipe of the profile (``lora_course`` is the course's
    r=4, α=1, lr 1e-3; ``lora`` the tuned recipe) and ``full``. With ``sweep=True`` it also runs
    the rank sweep and writes ``sweep.json``, ``rank_sweep.png`` and ``spectrum.png``
    (:func:`lora_lab.analysis.sweeps.analyse_run`; the companion PDF uses them); without it, those
    files left in ``out`` by an earlier run are removed, since they would not describe these
    results. An ``out`` that is a file is refused before training.

    Under ``torchrun`` every rank trains (:mod:`lora_lab.training.distributed`); rank 0 alone
    evaluates and writes ``out``, and the other ranks return the results it wrote.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # found now, not after the training
        raise NotADirectoryError(f"the output folder {out} is a file; pass a folder with --out (it is created)")
    world = distributed.current()
    if sweep and world.world_size > 1:
        raise ValueError("--sweep runs in one process; run it without torchrun (a plain run trains and caches "
                         "its own models: those of several processes are cached apart, their last bits differ)")
    exp = prepare(corpus, profile, overrides=overrides, device=device, cache=cache, progress=progress)
    base = pretrained_base(exp)
    trained = [base, *(lora_finetuned(exp, base, recipe) for recipe in exp.profile.recipes), full_finetuned(exp, base)]
    if not world.is_main:
        world.barrier()  # rank 0 evaluates and writes the results
        return RunResults.from_json((out / "results.json").read_text(encoding="utf-8"), where=str(out / "results.json"))
    results = RunResults(
        corpus=exp.corpus.name,
        profile=exp.profile.name,
        entropy_floor_ppl=entropy_floors(exp),
        models={model.name: evaluate(exp, model) for model in trained},
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
        analyse_run(exp, base, by_name["full"], by_name[TUNED_RECIPE], out, reference=results.models)
    else:  # an earlier run's sweep would otherwise sit next to these results, and the PDF would quote it
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
    write_outputs(exp.profile, results, out)
    world.barrier()
    return results


def claims(results: RunResults) -> dict[str, bool]:
    """The comparison's claims, each true or false (the cpu profile must make them all true on
    the built-in corpus; README reports them)."""
    m = results.models
    base, lora, full = m["base"], m[TUNED_RECIPE], m["full"]
    gap = base.target_ppl - full.target_ppl
    checked = {
        "lora_beats_base_on_target": lora.target_ppl < base.target_ppl,
        "lora_within_10pct_of_full": lora.target_ppl <= 1.10 * full.target_ppl,
        "lora_closes_70pct_of_gap": gap > 0 and (base.target_ppl - lora.target_ppl) >= 0.70 * gap,
        "lora_forgets_less_than_full": lora.source_ppl - base.source_ppl < full.source_ppl - base.source_ppl,
    }
    floors = results.entropy_floor_ppl
    if floors:
        checked["lora_samples_80pct_valid"] = (lora.valid_target_rate or 0.0) >= 0.80
        checked["no_model_below_floor"] = all(
            e.target_ppl >= floors["target"] and e.source_ppl >= floors["source"] for e in m.values()
        )
    return checked
