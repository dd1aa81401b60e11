"""What a run leaves in its output folder: ``results.json``, ``report.md`` (the comparison
table, how to read it, the claims and the samples) and the figures ``loss_curves.png`` and
``perplexities.png``. Every file is written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from ..analysis.figures import plot_loss_curves, plot_perplexities
from ..files import atomic_path, atomic_write_text, format_bytes
from .config import COURSE_BUDGET_RECIPE, COURSE_RECIPE, TUNED_RECIPE, Profile
from .results import RunResults
from .seeds import Spread

__all__ = ["format_table", "seeds_line", "sample_excerpt", "write_outputs", "OUTPUT_FILES", "SAMPLE_LINES"]

OUTPUT_FILES = ("results.json", "report.md", "loss_curves.png", "perplexities.png")

#: Lines of each sample the report prints (the whole samples are in results.json).
SAMPLE_LINES = 4


def format_table(results: RunResults) -> str:
    """The comparison as a Markdown table, models in the order the run trained them. Over several
    seeds perplexities and validity read ``mean ± d`` (every seed within d of the mean; see
    :func:`seeds_line`); sizes and times are the first seed's."""
    floors = results.entropy_floor_ppl
    lines = [
        "| model | target ppl | source ppl | trainable params | total params | train s | artifact | valid target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if floors:
        lines.append(f"| *entropy floor* | {floors['target']:.3f} | {floors['source']:.3f} | | | | | |")
    table = results.seed_table()
    for name, e in results.models.items():
        valid = "—" if e.valid_target_rate is None else _percent(table[name]["valid_target_rate"])
        size = "—" if e.artifact_bytes is None else format_bytes(e.artifact_bytes)
        lines.append(
            f"| {name} | {table[name]['target_ppl'].format()} | {table[name]['source_ppl'].format()} | "
            f"{e.trainable_params:,} | {e.total_params:,} | {e.train_seconds:.1f} | {size} | {valid} |"
        )
    return "\n".join(lines)


def _percent(spread: Spread) -> str:
    return spread.format(0, scale=100, unit="%")


def seeds_line(results: RunResults) -> str:
    """Which seeds the numbers come from and how to read ``±``."""
    seeds = ", ".join(map(str, results.seeds))
    if len(results.seeds) == 1:
        return f"One seed ({seeds}): each number is one training run."
    return (
        f"Seeds {seeds} (the corpus drawn once; the training seeds vary): perplexities and validity are "
        "the mean ± the largest distance of a seed from it, so every seed lies inside; claims are judged "
        "at the unfavourable end of each range. Parameters, time and size are the first seed's."
    )


def sample_excerpt(sample: str, lines: int = SAMPLE_LINES) -> str:
    """The first ``lines`` lines of a sample (the prompt's line included)."""
    return "\n".join(sample.split("\n")[:lines]).rstrip("\n")


def _gap_closed(results: RunResults, name: str) -> float:
    """The share of the base → full fine-tuning gap in target perplexity that ``name`` closes, from
    the means over the run's seeds (one seed: its values)."""
    mean = {model: results.spread(model, "target_ppl").mean for model in ("base", "full", name)}
    gap = mean["base"] - mean["full"]
    return (mean["base"] - mean[name]) / gap if gap > 0 else math.nan


def _closes(share: float) -> str:
    """"closes 87% of the gap"; past 100%, that the model ends below full fine-tuning."""
    if share > 1:
        return f"goes past full fine-tuning's target perplexity ({share:.0%} of the gap)"
    return f"closes {share:.0%} of the gap"


_FROM_MEANS = ", from the means over the seeds"


def _report(profile: Profile, results: RunResults) -> str:
    m = results.models
    lora = m[TUNED_RECIPE]
    tuned = profile.recipe(TUNED_RECIPE)
    several = len(results.seeds) > 1
    parts = [
        f"# lora_lab run — corpus `{results.corpus}`, profile `{results.profile}`",
        "",
        f"Machine: {results.machine}. Splits (characters): "
        + ", ".join(f"{k} {v:,}" for k, v in results.split_sizes.items())
        + ".",
        "",
        format_table(results),
        "",
        seeds_line(results),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![perplexities](perplexities.png)",
        "",
        "## Reading the numbers",
        f"- The gap is base → full fine-tuning in target perplexity{_FROM_MEANS if several else ''}. "
        f"The tuned LoRA recipe {_closes(_gap_closed(results, TUNED_RECIPE))} while training "
        f"{lora.trainable_params:,} of {lora.total_params:,} parameters "
        f"({lora.trainable_params / lora.total_params:.2%}).",
    ]
    if COURSE_RECIPE in m:
        course = profile.recipe(COURSE_RECIPE)
        parts.append(
            f"- The course's recipe (r={course.rank}, α={course.alpha:g}, lr {course.lr:g}) "
            f"{_closes(_gap_closed(results, COURSE_RECIPE))}. "
            f"Its update is scaled by α/r = {course.alpha / course.rank:g}: "
            f"with B starting at zero, ΔW = (α/r)·B·A grows {course.rank / course.alpha:g}× more slowly than the "
            "learning rate suggests, so in the same number of steps it moves less. The tuned recipe uses "
            f"r={tuned.rank}, α={tuned.alpha:g} (scaling {tuned.alpha / tuned.rank:g}) and lr {tuned.lr:g}."
        )
    if COURSE_BUDGET_RECIPE in m and COURSE_BUDGET_RECIPE in results.histories:
        steps = results.histories[COURSE_BUDGET_RECIPE].steps
        parts.append(
            f"- At the course's own budget ({profile.recipe(COURSE_BUDGET_RECIPE).epochs:g} epochs, {steps} steps) "
            f"its recipe {_closes(_gap_closed(results, COURSE_BUDGET_RECIPE))}: the course's setting, "
            "as the course ran it."
        )
    source = {model: results.spread(model, "source_ppl").format() for model in ("base", TUNED_RECIPE, "full")}
    parts.append(
        f"- Forgetting: source perplexity goes {source['base']} → {source[TUNED_RECIPE]} with LoRA and "
        f"→ {source['full']} with full fine-tuning{' (mean ± spread over the seeds)' if several else ''}."
    )
    if results.entropy_floor_ppl:
        parts.append("- The entropy floor is exact (computed from the corpus's grammars): no model can go below it.")
    parts += ["", "## Claims", ""]
    parts += [f"- {'✅' if ok else '❌'} {name.replace('_', ' ')}" for name, ok in results.claims.items()]
    parts += ["", f"## Samples (fixed prompts, seed {results.seeds[0]}; the first {SAMPLE_LINES} lines of each)", ""]
    for name, entry in m.items():
        parts.append(f"### {name}\n")
        for sample in entry.samples:
            parts += ["```", sample_excerpt(sample), "```"]
        parts.append("")
    return "\n".join(parts)


def write_outputs(profile: Profile, results: RunResults, out: Path) -> None:
    """Write :data:`OUTPUT_FILES` into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    models = {name: entry.to_dict() for name, entry in results.models.items()}
    figures = {
        "loss_curves.png": plot_loss_curves(results.histories, results.entropy_floor_ppl),
        "perplexities.png": plot_perplexities(models, results.entropy_floor_ppl),
    }
    for name, fig in figures.items():
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    atomic_write_text(out / "report.md", _report(profile, results))
    atomic_write_text(out / "results.json", results.to_json())
