"""The variants table read: as Markdown, as a figure, and which differences the seeds can tell apart."""

from __future__ import annotations

from dataclasses import dataclass

from ..files import format_bytes
from .variants import VariantsResults

__all__ = ["format_variants", "Difference", "differences_from_lora", "variants_figure"]


def _step_ratio(ratio: list[float]) -> str:
    return f"{ratio[0]:.2f} ({ratio[1]:.2f}–{ratio[2]:.2f})" if ratio else "—"


def format_variants(results: VariantsResults) -> str:
    """One Markdown table: target perplexity mean ± the largest distance of a seed from it, its distance to the
    floor in nats per character, forgetting (source perplexity), validity, sizes, step time."""
    floors = results.floors
    lines = [
        f"{results.profile} profile, {results.epochs:g} epochs, {results.seeds} seed(s); entropy floor: target "
        f"{floors['target']:.3f}, source {floors['source']:.3f}",
        "",
        "| variant | lr | target ppl | nats above floor | source ppl | valid | trainable | frozen base | step / LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in results.variants:
        valid = f"{100 * v.mean('valid_rate'):.0f}%" if v._values("valid_rate") else "—"
        frozen = format_bytes(v.frozen_bytes) if v.frozen_bytes else "— (all trained)"
        lines.append(
            f"| {v.label} | {v.lr:g} | {v.seed_spread('target_ppl').format(3)} "
            f"| {results.nats_to_floor(v.name):.4f} | {v.seed_spread('source_ppl').format(2)} "
            f"| {valid} | {v.trainable_params:,} | {frozen} | {_step_ratio(v.step_time_ratio)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Difference:
    """A variant's mean target perplexity against LoRA's, and whether the seeds' ranges overlap."""

    name: str
    difference: float  # variant − LoRA, mean target perplexity
    overlaps: bool  # the [min, max] ranges over the seeds overlap: the seeds cannot tell them apart


def differences_from_lora(results: VariantsResults) -> list[Difference]:
    lora = results.variant("lora").seed_spread("target_ppl")
    out = []
    for v in results.variants:
        if v.name != "lora":
            spread = v.seed_spread("target_ppl")
            out.append(Difference(v.name, spread.mean - lora.mean, spread.overlaps(lora)))
    return out


def variants_figure(results: VariantsResults):
    """Left: every seed's target perplexity per variant against the floor (log scale). Right:
    forgetting (source perplexity) against the target perplexity, one point per seed."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [v.label for v in results.variants]
    for i, v in enumerate(results.variants):
        values = v._values("target_ppl")
        left.scatter([i] * len(values), values, color=f"C{i}", zorder=3)
        left.hlines(v.mean("target_ppl"), i - 0.3, i + 0.3, color=f"C{i}")
        right.scatter(v._values("target_ppl"), v._values("source_ppl"), color=f"C{i}", label=v.label)
    left.axhline(results.floors["target"], color="k", linestyle="--", label="entropy floor")
    left.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    left.set_ylabel("target perplexity (held out)")
    left.set_title("fit: dots are seeds, bars their mean")
    left.legend()
    right.axvline(results.floors["target"], color="k", linestyle="--")
    right.set_xlabel("target perplexity")
    right.set_ylabel("source perplexity (forgetting)")
    right.set_title("fit vs forgetting")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
