"""rsLoRA against LoRA at the headline budget, over seeds: ``lora-lab rslora`` and notebook 06.

Notebook 02's toy and notebook 05's rank sweep compare the two scalings early in training (tens of
steps). This job trains both for the main job's budget (the profile's ``finetune.epochs``: 540
steps on the cpu profile) at several ranks and over several seeds. rsLoRA's α is chosen so that
the two take the same step at the tuned rank r₀ (α' = α/√r₀,
:func:`lora_lab.analysis.ablations.rslora_comparison`): at r₀ they are the same model, and at the
other ranks they differ only in how the scaling follows r. LoRA's effective step, scaling·r·lr,
stays α·lr at every rank; rsLoRA's grows like √r (:mod:`lora_lab.analysis.update_speed`).

Seed ``s`` fine-tunes the base pretrained with seed ``s``, as ``lora-lab run --seeds`` does, so the
cache shares the bases and the tuned LoRA runs with the main job. A difference is stated only where
the seeds' ranges do not overlap (:meth:`RsLoRAStudy.verdict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_text, json_text
from ..runtime import machine_description
from .config import TUNED_RECIPE
from .seeds import Spread, seed_experiment, seed_list
from .stages import Experiment, entropy_floors, pretrained_base

__all__ = [
    "METHODS", "ScalingRun", "RsLoRAStudy", "run_rslora_study", "write_rslora_study", "format_rslora_study",
    "plot_rslora_study",
]  # fmt: skip

#: The two scalings, as the study's files name them.
METHODS = {"lora": "LoRA, α/r", "rslora": "rsLoRA, α'/√r"}


@dataclass(frozen=True)
class ScalingRun:
    """One fine-tuning run of the study: a scaling, a rank, a seed, and what it reached."""

    method: str  # a key of METHODS
    rank: int
    seed: int
    alpha: float
    scaling: float  # α/r for LoRA, α'/√r for rsLoRA
    effective_step: float  # scaling · r · lr: what the update's growth follows across ranks
    steps: int
    target_ppl: float
    source_ppl: float


@dataclass
class RsLoRAStudy:
    """What ``lora-lab rslora`` writes (``paper/rslora.json``) and notebook 06 reads."""

    profile: str
    epochs: float
    lr: float
    seeds: list[int]
    ranks: list[int]
    matched_rank: int  # r₀: the rank at which both take the same step
    floors: dict[str, float] | None
    machine: str
    runs: list[ScalingRun]

    def spread(self, method: str, rank: int, metric: str = "target_ppl") -> Spread:
        """``metric`` of ``method`` at ``rank`` over the seeds."""
        values = [getattr(r, metric) for r in self.runs if r.method == method and r.rank == rank]
        if not values:
            raise KeyError(f"the study has no {method} run at rank {rank} (ranks: {self.ranks})")
        return Spread.of(values)

    def run(self, method: str, rank: int) -> ScalingRun:
        """The first seed's run of ``method`` at ``rank`` (its settings are every seed's)."""
        return next(r for r in self.runs if r.method == method and r.rank == rank)

    def verdict(self, rank: int, metric: str = "target_ppl") -> str | None:
        """The method with the lower ``metric`` at ``rank`` when the seeds' ranges do not overlap
        (every seed of one below every seed of the other), else None: the seeds cannot tell."""
        lora, rslora = self.spread("lora", rank, metric), self.spread("rslora", rank, metric)
        return "rslora" if rslora.below(lora) else "lora" if lora.below(rslora) else None

    def to_json(self) -> str:
        return json_text(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str = "rslora.json") -> RsLoRAStudy:
        """Read and check a study; every problem is named, with what to do."""
        hint = "rerun `lora-lab rslora` to write it again"
        try:
            data = json.loads(text)
            runs = [ScalingRun(**run) for run in data.pop("runs")]
            study = cls(**data, runs=runs)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{where} is not a study written by lora-lab rslora ({error}); {hint}") from None
        problems = []
        for run in study.runs:
            if run.method not in METHODS or run.rank not in study.ranks or run.seed not in study.seeds:
                problems.append(f"a run ({run.method}, rank {run.rank}, seed {run.seed}) is outside the study")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 1
                       for v in (run.target_ppl, run.source_ppl)):  # fmt: skip
                problems.append(f"{run.method} at rank {run.rank}, seed {run.seed}: perplexities must be ≥ 1")
        cells = [(r.method, r.rank, r.seed) for r in study.runs]
        expected = {(m, rank, seed) for m in METHODS for rank in study.ranks for seed in study.seeds}
        if len(cells) != len(set(cells)) or set(cells) != expected:
            problems.append(f"it must hold one run per method, rank and seed ({len(expected)}), got {len(cells)}")
        if study.matched_rank not in study.ranks:
            problems.append(f"matched_rank {study.matched_rank} is not one of the ranks {study.ranks}")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems) + f"; {hint}")
        return study


def run_rslora_study(exp: Experiment, *, seeds: int = 3, ranks: Sequence[int] = (4, 16, 64)) -> RsLoRAStudy:
    """Fine-tune with LoRA's and rsLoRA's scaling at each of ``ranks``, for the profile's budget,
    over ``seeds`` seeds (from the profile's seed on), through the cache."""
    from ..analysis.ablations import rslora_comparison  # the analysis layer builds on this package

    ranks = sorted({int(r) for r in ranks})
    tuned = exp.profile.recipe(TUNED_RECIPE)
    if tuned.rank not in ranks:
        raise ValueError(f"the ranks must include the tuned rank {tuned.rank}, where both scalings take the same "
                         f"step (the study's reference point), got {ranks}")  # fmt: skip
    seed_values = seed_list(exp.profile.seed, seeds)
    runs = []
    for seed in seed_values:
        seeded = seed_experiment(exp, seed)
        for entry in rslora_comparison(seeded, pretrained_base(seeded), ranks):
            runs.append(ScalingRun(
                method="rslora" if entry["use_rslora"] else "lora", rank=entry["rank"], seed=seed,
                alpha=entry["alpha"], scaling=entry["scaling"], effective_step=entry["effective_step"],
                steps=entry["steps"], target_ppl=entry["target_ppl"], source_ppl=entry["source_ppl"],
            ))  # fmt: skip
    return RsLoRAStudy(exp.profile.name, exp.profile.finetune.epochs, tuned.lr, seed_values, ranks, tuned.rank,
                       entropy_floors(exp), machine_description(), runs)  # fmt: skip


def write_rslora_study(study: RsLoRAStudy, path: str | Path) -> Path:
    """Write the study atomically (a reader never sees half of it)."""
    atomic_write_text(path, study.to_json())
    return Path(path)


def format_rslora_study(study: RsLoRAStudy) -> str:
    """A Markdown table: per rank, each scaling's s and effective step, target perplexity
    (mean ± the largest distance of a seed from it) and which is lower where the seeds can tell."""
    lines = [
        f"{study.profile} profile, {study.epochs:g} epochs ({study.run('lora', study.ranks[0]).steps} steps), "
        f"lr {study.lr:g}, seeds {', '.join(map(str, study.seeds))}; both scalings match at r = {study.matched_rank}",
        "",
        "| r | LoRA s | LoRA step | LoRA target ppl | rsLoRA s | rsLoRA step | rsLoRA target ppl | lower |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rank in study.ranks:
        lora, rs = study.run("lora", rank), study.run("rslora", rank)
        verdict = study.verdict(rank)
        lower = {"lora": "LoRA", "rslora": "rsLoRA", None: "inside the seeds' spread"}[verdict]
        lines.append(
            f"| {rank} | {lora.scaling:.3g} | {lora.effective_step:.3g} | {study.spread('lora', rank).format()} | "
            f"{rs.scaling:.3g} | {rs.effective_step:.3g} | {study.spread('rslora', rank).format()} | {lower} |"
        )
    return "\n".join(lines)


def plot_rslora_study(study: RsLoRAStudy):
    """Target perplexity against the rank for both scalings: each seed a dot, the mean a line."""
    import matplotlib.pyplot as plt

    from ..analysis.figures import figure_legend, readable

    @readable
    def draw():
        fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
        for (method, label), color, shift in zip(METHODS.items(), ("#3182bd", "#31a354"), (0.97, 1.03)):
            means = [study.spread(method, rank).mean for rank in study.ranks]
            ax.plot(study.ranks, means, marker="o", color=color, label=f"{label} (mean)")
            for rank in study.ranks:  # the seeds side by side, a little apart so both methods show
                values = study.spread(method, rank).values
                ax.scatter([rank * shift] * len(values), values, color=color, alpha=0.5, s=18, zorder=3)
        if study.floors:
            ax.axhline(study.floors["target"], color="k", lw=0.8, label="entropy floor")
        ax.set_xscale("log", base=2)
        ax.set_xticks(study.ranks, [str(r) for r in study.ranks])
        ax.minorticks_off()
        ax.set(xlabel="rank r", ylabel="target perplexity per character",
               title=f"Fully trained ({study.run('lora', study.ranks[0]).steps} steps), {len(study.seeds)} seeds")
        figure_legend(fig)
        return fig

    return draw()
