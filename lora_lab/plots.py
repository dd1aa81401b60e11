"""Figures shared by the main job's report, the notebooks and the companion PDF."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .train import TrainResult

__all__ = ["plot_loss_curves", "plot_perplexities", "MODEL_COLORS"]

MODEL_COLORS = {"base": "#7f7f7f", "lora_seed": "#9ecae1", "lora": "#3182bd", "full": "#e6550d"}
LABELS = {
    "base": "base (no fine-tuning)",
    "lora_seed": "LoRA, seed recipe",
    "lora": "LoRA, tuned recipe",
    "full": "full fine-tuning",
}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(histories: dict[str, TrainResult], floors: dict[str, float] | None = None) -> Figure:
    """Left: pretraining on the source; right: fine-tuning runs on the target (validation
    loss in nats/char). Dashed lines: the entropy floors, when known."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    if "base" in histories:
        h = histories["base"]
        left.plot(_smooth(h.train_loss, 20), color="#bbbbbb", label="train (smoothed)")
        left.plot(*zip(*h.val_loss), "o-", color=MODEL_COLORS["base"], label="validation")
        if floors:
            left.axhline(math.log(floors["source"]), ls="--", color="k", lw=1, label="entropy floor")
    left.set(title="Pretraining on the source part (80%)", xlabel="step", ylabel="loss (nats/char)")
    left.legend()
    for name, h in histories.items():
        if name != "base" and h.val_loss:
            right.plot(*zip(*h.val_loss), "o-", color=MODEL_COLORS.get(name), label=LABELS.get(name, name))
    if floors:
        right.axhline(math.log(floors["target"]), ls="--", color="k", lw=1, label="entropy floor")
    right.set(title="Fine-tuning on the target part (20%)", xlabel="step", ylabel="validation loss (nats/char)")
    right.legend()
    return fig


def plot_perplexities(models: dict[str, dict], floors: dict[str, float] | None = None) -> Figure:
    """Target and source perplexity of each model, with the entropy floors."""
    names = list(models)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, split in zip(axes, ("target", "source")):
        values = [models[n][f"{split}_ppl"] for n in names]
        bars = ax.bar([LABELS.get(n, n) for n in names], values, color=[MODEL_COLORS.get(n, "#999") for n in names])
        ax.bar_label(bars, fmt="%.3f")
        if floors:
            ax.axhline(floors[split], ls="--", color="k", lw=1, label=f"entropy floor {floors[split]:.3f}")
            ax.legend(loc="lower right")
        ax.set(
            title=f"{split.capitalize()} perplexity per character (lower is better)",
            ylabel="perplexity",
            ylim=(min(values + ([floors[split]] if floors else [])) * 0.9, max(values) * 1.05),
        )
        ax.tick_params(axis="x", rotation=15)
    return fig
