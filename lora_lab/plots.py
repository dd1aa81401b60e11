"""Figures shared by the main job's report, the notebooks and the companion PDF."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ParamSpec

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .train import TrainResult

__all__ = ["plot_loss_curves", "plot_perplexities", "readable", "figure_legend", "MODEL_COLORS"]

MODEL_COLORS = {"base": "#7f7f7f", "lora_seed": "#9ecae1", "lora": "#3182bd", "full": "#e6550d"}
LABELS = {
    "base": "base (no fine-tuning)",
    "lora_seed": "LoRA, seed recipe",
    "lora": "LoRA, tuned recipe",
    "full": "full fine-tuning",
}
#: Short versions of LABELS for bar charts: four bars share ~4.5 in, ~10 characters a line at 14 pt.
TICK_LABELS = {"base": "base", "lora_seed": "LoRA\n(seed)", "lora": "LoRA\n(tuned)", "full": "full\nfine-tuning"}

#: The figures keep their notebook sizes (about 11 in wide for two panels) and the companion PDF
#: shrinks them to its 16.2 cm (6.4 in) text width, i.e. to ~58%: 14-pt text prints as ~8 pt,
#: the smallest size that stays comfortable to read (matplotlib's default 10 pt would print as 6).
FONT_SIZES = {
    "font.size": 14,
    "axes.titlesize": 15,
    "axes.labelsize": 14,
    "xtick.labelsize": 14,
    "ytick.labelsize": 14,
    "legend.fontsize": 14,
    "legend.title_fontsize": 14,
}

P = ParamSpec("P")


def readable(plot: Callable[P, Figure]) -> Callable[P, Figure]:
    """Decorator: draw ``plot``'s figure with :data:`FONT_SIZES`. Every text keeps the size it was
    created with (tick labels made later, when the figure is drawn, copy the first tick's), so the
    figure stays readable wherever it is saved or shown."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with plt.rc_context(FONT_SIZES):
            return plot(*args, **kwargs)

    return wrapper


def figure_legend(fig: Figure, ncols: int = 3) -> None:
    """One legend for all panels, under them (outside every axes, so it hides no data). Entries
    with the same label in several panels are shown once; nothing is drawn if nothing is labelled."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="outside lower center",
            ncols=min(ncols, len(entries)),
            frameon=False,
        )


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@readable
def plot_loss_curves(histories: dict[str, TrainResult], floors: dict[str, float] | None = None) -> Figure:
    """Left: pretraining on the source; right: fine-tuning runs on the target (validation
    loss in nats/char). Dashed lines: the entropy floors, when known."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    if "base" in histories:
        h = histories["base"]
        left.plot(_smooth(h.train_loss, 20), color="#bbbbbb", label="base: train loss (smoothed)")
        left.plot(*zip(*h.val_loss), "o-", color=MODEL_COLORS["base"], label="base: validation loss")
        if floors:
            left.axhline(math.log(floors["source"]), ls="--", color="k", lw=1, label="entropy floor")
    left.set(title="Pretraining on the source part (80%)", xlabel="step", ylabel="loss (nats/char)")
    for name, h in histories.items():
        if name != "base" and h.val_loss:
            right.plot(*zip(*h.val_loss), "o-", color=MODEL_COLORS.get(name), label=LABELS.get(name, name))
    if floors:
        right.axhline(math.log(floors["target"]), ls="--", color="k", lw=1, label="entropy floor")
    right.set(title="Fine-tuning on the target part (20%)", xlabel="step", ylabel="validation loss (nats/char)")
    figure_legend(fig)
    return fig


def _log_ticks(low: float, high: float) -> list[float]:
    """Round tick values between ``low`` and ``high`` for a log axis: 1-1.5-2-3-5-7 steps per
    decade, thinned to 1-2-5 and then to powers of ten until at most 8 remain. A range too narrow
    to hold two of those (all perplexities within a few percent) gets evenly spaced round values."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for steps in ((1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1,)):
        ticks = [m * 10**k for k in decades for m in steps if low <= m * 10**k <= high]
        if len(ticks) <= 8:
            break
    if len(ticks) < 2:
        ticks = [float(t) for t in MaxNLocator(4).tick_values(low, high) if low <= t <= high]
    return ticks


@readable
def plot_perplexities(models: dict[str, dict], floors: dict[str, float] | None = None) -> Figure:
    """Target and source perplexity of each model (log scale: equal steps are equal differences
    in loss), with the entropy floors as dashed lines. The legend sits under the panels and each
    bar's value above it, with headroom, so no label can hide another."""
    names = list(models)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, split in zip(axes, ("target", "source")):
        values = [models[n][f"{split}_ppl"] for n in names]
        bars = ax.bar(
            [TICK_LABELS.get(n, n) for n in names], values, color=[MODEL_COLORS.get(n, "#999") for n in names]
        )
        ax.bar_label(bars, fmt="%.3f", padding=2)
        shown = values + ([floors[split]] if floors else [])
        if floors:
            ax.axhline(floors[split], ls="--", color="k", lw=1)
        # Log-axis limits: a little room under the lowest value, and 20% of the axis height above
        # the highest bar for its value label (which would otherwise run into the title).
        low, high = math.log10(min(shown) / 1.05), math.log10(max(shown))
        ax.set_yscale("log")
        ax.set_ylim(10**low, 10 ** (high + 0.25 * (high - low)))
        ticks = _log_ticks(*ax.get_ylim())
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set(title=f"{split.capitalize()} perplexity per character", ylabel="perplexity (log scale)")
    if floors:
        label = f"entropy floor: target {floors['target']:.3f}, source {floors['source']:.3f}"
        axes[0].plot([], [], ls="--", color="k", lw=1, label=label)
    figure_legend(fig)
    return fig
