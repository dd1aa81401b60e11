"""``lora-lab run``: pretrain → LoRA (seed and tuned recipes) → full fine-tuning → comparison.

Writes ``results.json`` (a contract other tools read, see :func:`run`), ``report.md`` and the
figures ``loss_curves.png`` and ``perplexities.png`` into the output folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .io import atomic_path, atomic_write_json, atomic_write_text
from .pipeline import (
    Experiment,
    entropy_floors,
    evaluate_model,
    full_finetuned,
    lora_finetuned,
    machine_description,
    prepare,
    pretrained_base,
)
from .plots import plot_loss_curves, plot_perplexities

__all__ = ["run", "format_table", "quality_checks"]

ORDER = ("base", "lora_seed", "lora", "full")


def run(
    corpus: str = "builtin",
    profile: str = "cpu",
    out: str | os.PathLike = "runs/latest",
    *,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    sweep: bool = False,
    **overrides,
) -> dict:
    """Run the whole comparison and write its artifacts into ``out``; return results.json's dict::

        {"corpus": str, "profile": str,
         "entropy_floor_ppl": {"source": float, "target": float} | null,
         "models": {"base": M, "lora_seed": M, "lora": M, "full": M}}
        M = {"target_ppl", "source_ppl", "trainable_params", "total_params", "train_seconds",
             "artifact_bytes", "valid_target_rate" (null for real text), "samples": [str, ...]}

    ``lora`` is the recommended (tuned) LoRA recipe, ``lora_seed`` the seed's r=4, α=1, lr 1e-3.
    With ``sweep=True`` it also runs the rank sweep and writes ``sweep.json``, ``rank_sweep.png``
    and ``spectrum.png`` (:func:`lora_lab.analysis.analyse_run`; the companion PDF uses them);
    without it, those files left in ``out`` by an earlier run are removed, since they would not
    describe these results. A folder given as ``out`` that is a file is refused before training.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # found now, not after the training
        raise NotADirectoryError(f"the output folder {out} is a file; pass a folder with --out (it is created)")
    exp = prepare(corpus, profile, device=device, cache=cache, progress=progress, **overrides)
    base = pretrained_base(exp)
    models = {
        "base": base,
        "lora_seed": lora_finetuned(exp, base, exp.seed_recipe()),
        "lora": lora_finetuned(exp, base, exp.tuned_recipe()),
        "full": full_finetuned(exp, base),
    }
    floors = entropy_floors(exp)
    results = {
        "corpus": exp.corpus.name,
        "profile": exp.profile.name,
        "entropy_floor_ppl": floors,
        "models": {name: evaluate_model(exp, model, name) for name, model in models.items()},
        "recipes": {r.name: r.to_dict() for r in (exp.seed_recipe(), exp.tuned_recipe())},
        "profile_settings": exp.profile.to_dict(),
        "corpus_sha256": exp.corpus.sha256,
        "split_sizes": exp.splits.sizes(),
        "machine": machine_description(),
        "histories": {name: h.to_dict() for name, h in exp.trained.items()},
    }
    results["checks"] = quality_checks(results)
    from .analysis import SWEEP_FILES, analyse_run

    if sweep:
        analyse_run(exp, base, models["full"], models["lora"], out, reference=results["models"])
    else:  # an earlier run's sweep would otherwise sit next to these results, and the PDF would quote it
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
    write_outputs(exp, results, out)
    return results


def quality_checks(results: dict) -> dict[str, bool]:
    """The comparison's claims as booleans (the cpu profile must make them all True on the
    built-in corpus; README reports them)."""
    m = results["models"]
    base, lora, full = m["base"], m["lora"], m["full"]
    gap = base["target_ppl"] - full["target_ppl"]
    checks = {
        "lora_beats_base_on_target": lora["target_ppl"] < base["target_ppl"],
        "lora_within_10pct_of_full": lora["target_ppl"] <= 1.10 * full["target_ppl"],
        "lora_closes_70pct_of_gap": gap > 0 and (base["target_ppl"] - lora["target_ppl"]) >= 0.70 * gap,
        "lora_forgets_less_than_full": lora["source_ppl"] - base["source_ppl"]
        < full["source_ppl"] - base["source_ppl"],
    }
    floors = results.get("entropy_floor_ppl")
    if floors:
        checks["lora_samples_80pct_valid"] = (lora["valid_target_rate"] or 0.0) >= 0.80
        checks["no_model_below_floor"] = all(
            e["target_ppl"] >= floors["target"] and e["source_ppl"] >= floors["source"] for e in m.values()
        )
    return checks


def format_table(results: dict) -> str:
    """The comparison as a Markdown table."""
    floors = results.get("entropy_floor_ppl")
    lines = [
        "| model | target ppl | source ppl | trainable params | total params | train s | artifact | valid target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if floors:
        lines.append(f"| *entropy floor* | {floors['target']:.3f} | {floors['source']:.3f} | | | | | |")
    for name in [n for n in ORDER if n in results["models"]]:
        e = results["models"][name]
        valid = "—" if e["valid_target_rate"] is None else f"{e['valid_target_rate']:.0%}"
        size = "—" if e["artifact_bytes"] is None else _bytes(e["artifact_bytes"])
        lines.append(
            f"| {name} | {e['target_ppl']:.3f} | {e['source_ppl']:.3f} | {e['trainable_params']:,} | "
            f"{e['total_params']:,} | {e['train_seconds']:.1f} | {size} | {valid} |"
        )
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _report(exp: Experiment, results: dict) -> str:
    m = results["models"]
    seed_lora, lora, base, full = m["lora_seed"], m["lora"], m["base"], m["full"]
    gap = base["target_ppl"] - full["target_ppl"]
    closed = (base["target_ppl"] - lora["target_ppl"]) / gap if gap > 0 else math.nan
    seed_closed = (base["target_ppl"] - seed_lora["target_ppl"]) / gap if gap > 0 else math.nan
    p = exp.profile
    parts = [
        f"# lora_lab run — corpus `{results['corpus']}`, profile `{results['profile']}`",
        "",
        f"Machine: {results['machine']}. Splits (characters): "
        + ", ".join(f"{k} {v:,}" for k, v in results["split_sizes"].items())
        + ".",
        "",
        format_table(results),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![perplexities](perplexities.png)",
        "",
        "## Reading the numbers",
        f"- The tuned LoRA recipe closes {closed:.0%} of the base → full fine-tuning gap in target perplexity "
        f"while training {lora['trainable_params']:,} of {lora['total_params']:,} parameters "
        f"({lora['trainable_params'] / lora['total_params']:.2%}).",
        f"- The seed's recipe (r={p.lora_rank}, α={p.lora_alpha:g}, lr {p.lora_lr:g}) closes {seed_closed:.0%}. "
        f"Its update is scaled by α/r = {p.lora_alpha / p.lora_rank:g}: with B starting at zero, ΔW = (α/r)·B·A "
        f"grows {p.lora_rank / p.lora_alpha:g}× more slowly than the learning rate suggests, so in the same "
        f"number of steps it moves less. The tuned recipe uses r={p.tuned_rank}, α={p.tuned_alpha:g} "
        f"(scaling {p.tuned_alpha / p.tuned_rank:g}) and lr {p.tuned_lr:g}.",
        f"- Forgetting: source perplexity goes {base['source_ppl']:.3f} → {lora['source_ppl']:.3f} with LoRA and "
        f"→ {full['source_ppl']:.3f} with full fine-tuning.",
    ]
    if results.get("entropy_floor_ppl"):
        parts.append("- The entropy floor is exact (computed from the corpus's grammars): no model can go below it.")
    parts += ["", "## Quality checks", ""]
    parts += [f"- {'✅' if ok else '❌'} {name.replace('_', ' ')}" for name, ok in results["checks"].items()]
    parts += ["", "## Samples (fixed prompts and seed)", ""]
    for name in ORDER:
        parts.append(f"### {name}\n")
        parts += ["```", *[s.rstrip("\n") for s in m[name]["samples"]], "```", ""]
    return "\n".join(parts)


def write_outputs(exp: Experiment, results: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss_curves.png": plot_loss_curves(
            {k: exp.trained[k] for k in ORDER if k in exp.trained}, results["entropy_floor_ppl"]
        ),
        "perplexities.png": plot_perplexities({k: results["models"][k] for k in ORDER}, results["entropy_floor_ppl"]),
    }
    for name, fig in figures.items():
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    atomic_write_text(out / "report.md", _report(exp, results))
    atomic_write_json(out / "results.json", results)
