"""The figures: shared by the main job's report, the notebooks and the companion PDF.

* Style: :data:`MODEL_COLORS`, :data:`LABELS` and :data:`TICK_LABELS` name each model the same
  way everywhere; :func:`readable` draws a figure at :data:`FONT_SIZES` and
  :func:`figure_legend` puts one legend under all of its panels.
* The main job's comparison: :func:`plot_loss_curves` and :func:`plot_perplexities`.
* The analysis: :func:`plot_rank_sweep` and :func:`plot_sweep_bars` (sweeps, from
  :mod:`~lora_lab.analysis.sweeps`), :func:`plot_spectrum` and :func:`plot_subspace_similarity`
  (the low-rank analysis, from :mod:`~lora_lab.analysis.low_rank`).

Reference models may be given as :class:`~lora_lab.experiment.results.ModelResult`\\ s or as
``results.json``'s ``models`` entries.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..training import TrainHistory
from ._entries import ModelEntry, model_entries
from .low_rank import energy_curve, layer_type, singular_values, subspace_similarity_matrix

__all__ = [
    "MODEL_COLORS",
    "LABELS",
    "TICK_LABELS",
    "LINE_STYLES",
    "FONT_SIZES",
    "readable",
    "figure_legend",
    "plot_loss_curves",
    "plot_perplexities",
    "plot_rank_sweep",
    "plot_sweep_bars",
    "plot_spectrum",
    "plot_subspace_similarity",
]

# --- style -----------------------------------------------------------------------------------

#: One colour per model of the main job, in every figure.
MODEL_COLORS = {
    "base": "#7f7f7f", "lora_course": "#9ecae1", "lora_course_5ep": "#c6dbef", "lora": "#3182bd", "full": "#e6550d"
}  # fmt: skip
#: The models' names in legends.
LABELS = {
    "base": "base (no fine-tuning)",
    "lora_course": "LoRA, course recipe",
    "lora_course_5ep": "LoRA, course recipe, 5 epochs",
    "lora": "LoRA, tuned recipe",
    "full": "full fine-tuning",
}
#: How each model's line is drawn where lines may coincide (tuned LoRA and full fine-tuning end
#: within a percent of each other): full fine-tuning wide and translucent underneath, the LoRA runs
#: thin, with their own markers and dash patterns, on top, so every legend entry stays visible.
LINE_STYLES = {
    "base": {"marker": "o", "ls": "-", "lw": 1.5, "zorder": 2},
    "full": {"marker": None, "ls": "-", "lw": 5.0, "alpha": 0.45, "zorder": 2},
    "lora_course": {"marker": "s", "ls": ":", "lw": 1.5, "markersize": 5, "zorder": 3},
    "lora": {"marker": "o", "ls": "--", "lw": 1.5, "markersize": 4, "zorder": 4},
}
#: Short versions of LABELS for bar charts: four bars share ~4.5 in, ~10 characters a line at 14 pt.
TICK_LABELS = {
    "base": "base", "lora_course": "LoRA\n(course)", "lora_course_5ep": "course\n5 ep.", "lora": "LoRA\n(tuned)",
    "full": "full\nfine-tuning",
}  # fmt: skip

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


# --- the main job's comparison --------------------------------------------------------------


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@readable
def plot_loss_curves(histories: Mapping[str, TrainHistory], floors: Mapping[str, float] | None = None) -> Figure:
    """Left: pretraining on the source; right: fine-tuning runs on the target. Dashed lines: the
    entropy floors, when known. With the target's floor known and every fine-tuning run above it,
    the right panel shows the validation loss *above the floor* on a log axis (as
    :func:`plot_perplexities` does): runs that end a hundredth of a nat apart, near the floor,
    then end visibly apart instead of on one line."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    if "base" in histories:
        h = histories["base"]
        left.plot(_smooth(h.train_loss, 20), color="#bbbbbb", label="base: train loss (smoothed)")
        left.plot(*zip(*h.val_loss), "o-", color=MODEL_COLORS["base"], label="base: validation loss")
        if floors:
            left.axhline(math.log(floors["source"]), ls="--", color="k", lw=1, label="entropy floor")
    left.set(title="Pretraining on the source part (80%)", xlabel="step", ylabel="loss (nats/char)")
    runs = {name: h for name, h in histories.items() if name != "base" and h.val_loss}
    floor = math.log(floors["target"]) if floors else None
    excess = floor is not None and all(loss > floor for h in runs.values() for _, loss in h.val_loss)
    for name, h in runs.items():
        style = LINE_STYLES.get(name, {"marker": "o", "ls": "-"})
        steps, losses = zip(*h.val_loss)
        y = [loss - floor for loss in losses] if excess else losses
        right.plot(steps, y, color=MODEL_COLORS.get(name), label=LABELS.get(name, name), **style)
    if excess:
        right.set_yscale("log")
    elif floor is not None:
        right.axhline(floor, ls="--", color="k", lw=1, label="entropy floor")
    right.set(title="Fine-tuning on the target part (20%)", xlabel="step",
              ylabel="nats/char above the floor" if excess else "validation loss (nats/char)")  # fmt: skip
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
def plot_perplexities(models: Mapping[str, ModelEntry], floors: Mapping[str, float] | None = None) -> Figure:
    """Target and source perplexity of each model. With the entropy floors known, each bar is the
    model's *excess loss* over the floor, ``ln ppl − H`` in nats per character (what is left to
    learn: 1.61 against 1.63 is then 0.02 against 0.03 nats, not two slivers of a log axis), and
    its label gives the perplexity too. Without floors: perplexity on a log axis (equal steps are
    equal differences in loss). Each bar's value sits above it, with headroom."""
    models = model_entries(models)
    if floors:
        return _plot_excess(models, floors)
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


def _plot_excess(models: Mapping[str, ModelEntry], floors: Mapping[str, float]) -> Figure:
    """One dot per model at its excess loss over the floor, target above source. The excesses span
    orders of magnitude (the base model's 3 nats against fine-tuned models' 0.02), so the axis is
    logarithmic and the models are dots, not bars, which on a log axis would grow from an arbitrary
    baseline. A model at or below the floor (a bug, see notebook 03) cannot sit on a log axis: the
    panel then uses a linear one and says so."""
    names = list(models)
    # One panel above the other, each the figure's full width: five models' two-line labels and
    # tick labels ("full\nfine-tuning") need ~1.5 in each, twice what a side-by-side panel gives.
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.6), layout="constrained")
    for ax, split in zip(axes, ("target", "source")):
        ppls = [models[n][f"{split}_ppl"] for n in names]
        excess = [math.log(p) - math.log(floors[split]) for p in ppls]
        x = range(len(names))
        ax.scatter(x, excess, s=90, color=[MODEL_COLORS.get(n, "#999") for n in names], edgecolors="k", zorder=3)
        for i, (e, p) in enumerate(zip(excess, ppls)):
            ax.annotate(
                f"{e:.3f}\n(ppl {p:.3f})", (i, e), xytext=(0, 10), textcoords="offset points", ha="center", va="bottom"
            )
        ax.set_xticks(list(x), [TICK_LABELS.get(n, n) for n in names])
        ax.set_xlim(-0.6, len(names) - 0.4)
        word = "Target (fine-tuning)" if split == "target" else "Source (forgetting)"
        if min(excess) > 0:
            ax.set_yscale("log")
            low, high = math.log10(min(excess)), math.log10(max(excess))
            pad = max(0.3, 0.15 * (high - low))
            ax.set_ylim(10 ** (low - pad), 10 ** (high + 2.5 * pad))  # room above the top dot for its label
            ax.set(title=f"{word}: floor ppl {floors[split]:.3f}", ylabel="nats/char above the floor (log)")
        else:
            low, high = min(min(excess), 0.0), max(max(excess), 0.0)
            span = (high - low) or 1.0
            ax.set_ylim(low - 0.1 * span, high + 0.35 * span)  # room above the top dot for its label
            ax.axhline(0, color="k", lw=0.8)
            ax.set(title=f"{word}: a model is BELOW the floor", ylabel="nats/char above the floor")
        ax.grid(axis="y", which="major", alpha=0.3)
    return fig


# --- the analysis' figures -----------------------------------------------------------------

_REFERENCE_STYLES = {"base": "--", "lora": ":", "full": "-."}
#: Short names for the reference models, for the notes in a panel's title.
_SHORT_NAMES = {"base": "base", "lora": "tuned LoRA", "full": "full fine-tuning"}


def _reference_lines(
    ax: Axes,
    split: str,
    reference: Mapping[str, ModelEntry] | None,
    floors: Mapping[str, float] | None,
    data: Sequence[float] | None = None,
    *,
    fit_axis: bool = True,
    lora_rank: int | None = None,
) -> list[str]:
    """Horizontal lines for the reference models and the entropy floor. Given the plotted
    ``data``, a reference far above it (the base model, whose target perplexity would squash
    every difference the sweep shows) is not drawn: it is returned as a note ("base 47.238")
    for the panel's title instead; with ``fit_axis`` the y-axis is also fitted to the data and
    the lines near it (bar charts keep their zero baseline).

    Tuned LoRA and full fine-tuning may end within a percent of each other, i.e. on one line at
    the axis' scale. Given the tuned recipe's ``lora_rank``, tuned LoRA is therefore a star at
    that rank (one run, fully trained) on top of full fine-tuning's wide band; without it, a
    dotted line over the band, with a marker at each rank drawn."""
    reference = model_entries(reference)
    # label -> (model, value, line style, colour, short name); the floor is no model
    lines = {"entropy floor": (None, floors[split], "-", "k", "entropy floor")} if floors else {}
    for name, style in _REFERENCE_STYLES.items():
        if name in reference and f"{split}_ppl" in reference[name]:
            value = reference[name][f"{split}_ppl"]
            lines[LABELS.get(name, name)] = (name, value, style, MODEL_COLORS[name], _SHORT_NAMES[name])
    notes = []
    shown = [v for v in data or () if math.isfinite(v)]  # a run without a source perplexity plots NaN
    if shown:
        near = [value for _, value, *_ in lines.values() if value <= 1.5 * max(shown)]
        low, high = min(shown + near), max(shown + near)
        if fit_axis:
            ax.set_ylim(low - 0.08 * (high - low), high + 0.08 * (high - low))
    for label, (name, value, style, color, short) in lines.items():
        if shown and value > high:
            notes.append(f"{short} {value:.3f}")
        elif name == "lora":
            if lora_rank is not None:
                ax.plot([lora_rank], [value], ls="none", marker="*", markersize=17, color=color,
                        markeredgecolor="k", zorder=5, label=f"{label} (r = {lora_rank}, fully trained)")  # fmt: skip
            else:  # at the x of the points already drawn (bar charts have none: a plain line)
                xs = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
                if xs:
                    ax.plot(xs, [value] * len(xs), ls=style, color=color, lw=1.2, marker="D", markersize=5,
                            zorder=4, label=label)  # fmt: skip
                else:
                    ax.axhline(value, ls=style, color=color, lw=1.2, zorder=4, label=label)
        else:
            wide = name == "full"  # drawn under the others, so a line on top of it stays visible
            ax.axhline(
                value,
                ls="-" if wide else style,
                color=color,
                label=label,
                lw=4.0 if wide else (0.8 if name is None else 1.2),
                alpha=0.45 if wide else 1.0,
                zorder=1 if wide else 2,
            )
    return notes


def _title(ax: Axes, title: str, notes: Sequence[str] = ()) -> None:
    """``title``, with the references drawn above the axis (if any) named under it, wrapped to
    the ~40 characters a panel's width holds at the figures' font size."""
    # No-break spaces inside each note, so a line breaks only between notes, not inside a name.
    note = textwrap.fill("above the axis: " + ", ".join(n.replace(" ", "\u00a0") for n in notes), 40) if notes else ""
    ax.set_title("\n".join(filter(None, (title, note))))


@readable
def plot_rank_sweep(
    runs: Sequence[Mapping],
    reference: Mapping[str, ModelEntry] | None = None,
    floors: Mapping[str, float] | None = None,
    *,
    others: Mapping[str, Sequence[Mapping]] | None = None,
    lora_rank: int | None = None,
) -> Figure:
    """Target (left) and source (right) perplexity against the rank (log scale), with the
    reference models of ``reference`` (the run's measured models: base, lora, full) as
    horizontal lines, tuned LoRA as a star at its rank ``lora_rank`` when given, and further
    series ``others`` (``{label: runs}``, e.g. an rsLoRA sweep) dashed. Without source
    perplexities the right panel shows trainable parameters. One legend for both panels sits
    under them."""
    series = {"LoRA, α fixed" if _alpha_fixed(runs) else "LoRA": runs, **(others or {})}
    ranks = sorted({run["rank"] for group in series.values() for run in group})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    has_source = all("source_ppl" in run for group in series.values() for run in group)
    panels = (("target", "target_ppl"), ("source", "source_ppl") if has_source else ("params", "trainable_params"))
    extra_colors = ("#31a354", "#756bb1", "#e377c2")
    for ax, (split, key) in zip(axes, panels):
        for n, (label, group) in enumerate(series.items()):
            group = sorted(group, key=lambda run: run["rank"])
            color, style = (MODEL_COLORS["lora"], "-") if n == 0 else (extra_colors[(n - 1) % 3], "--")
            x, y = [run["rank"] for run in group], [run[key] for run in group]
            ax.plot(x, y, marker="o", ls=style, color=color, label=label)
        if split == "params":
            ax.set(ylabel="parameters", yscale="log")
            _title(ax, "Trainable parameters, r·Σ(d_in + d_out)")
        else:
            data = [run[key] for group in series.values() for run in group]
            notes = _reference_lines(ax, split, reference, floors, data, lora_rank=lora_rank)
            ax.set_ylabel("perplexity per character")
            word = "Target perplexity (fine-tuning)" if split == "target" else "Source perplexity (forgetting)"
            _title(ax, word, notes)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
    figure_legend(fig)
    return fig


def _alpha_fixed(runs: Sequence[Mapping]) -> bool:
    return len({run.get("alpha") for run in runs}) == 1 and len(runs) > 1 and not any(r.get("use_rslora") for r in runs)


@readable
def plot_sweep_bars(
    runs: Sequence[Mapping],
    label_key: str,
    reference: Mapping[str, ModelEntry] | None = None,
    floors: Mapping[str, float] | None = None,
    *,
    xlabel: str | None = None,
) -> Figure:
    """Target and source perplexity of each run as bars labelled by ``run[label_key]``
    (the α sweep, the target-module sweep), with the reference models as lines."""
    labels = [f"{run[label_key]:g}" if isinstance(run[label_key], float) else str(run[label_key]) for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for ax, split in zip(axes, ("target", "source")):
        values = [run.get(f"{split}_ppl", math.nan) for run in runs]
        bars = ax.bar(labels, values, color=MODEL_COLORS["lora"])
        ax.bar_label(bars, fmt="%.3f", padding=2)
        ax.margins(y=0.15)  # headroom for the value labels above the bars
        notes = _reference_lines(ax, split, reference, floors, values, fit_axis=False)
        ax.set(ylabel="perplexity", xlabel=xlabel or label_key)
        _title(ax, f"{split.capitalize()} perplexity per character", notes)
    figure_legend(fig)
    return fig


def _spectra_by_type(deltas: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    spectra: dict[str, list[torch.Tensor]] = {}
    for name, delta in deltas.items():
        spectra.setdefault(layer_type(name), []).append(singular_values(delta))
    return spectra


def _mean_energy_curve(spectra: Sequence[torch.Tensor]) -> torch.Tensor:
    """The energy curves of one layer type's blocks, averaged over the directions they all have."""
    size = min(len(s) for s in spectra)
    return torch.stack([energy_curve(s)[:size] for s in spectra]).mean(0)


@readable
def plot_spectrum(
    full_deltas: Mapping[str, torch.Tensor],
    lora_deltas: Mapping[str, torch.Tensor] | None = None,
    *,
    lora_rank: int | None = None,
) -> Figure:
    """Left: the normalised singular values ``σ_i / σ_1`` of full fine-tuning's ``ΔW``, per
    layer type (mean over the blocks; log scale). Right: the energy ``Σ_{j≤k} σ_j² / ‖ΔW‖_F²``
    that the top k directions hold, for full fine-tuning (solid) and LoRA (dashed; it reaches 1
    at k = r). A dotted line marks LoRA's rank. One legend for both panels sits under them."""
    if not full_deltas:
        raise ValueError("plot_spectrum needs at least one full fine-tuning ΔW")
    full = _spectra_by_type(full_deltas)
    lora = _spectra_by_type(lora_deltas) if lora_deltas else {}
    colors = plt.get_cmap("tab10").colors
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for n, (kind, spectra) in enumerate(full.items()):
        color = colors[n % len(colors)]
        size = min(len(s) for s in spectra)
        normalised = torch.stack([(s / s[0] if s[0] > 0 else s)[:size] for s in spectra]).mean(0)
        index = range(1, size + 1)
        left.plot(index, normalised.clamp_min(1e-6), color=color, label=f"{kind} (×{len(spectra)})")
        right.plot(index, _mean_energy_curve(spectra), color=color)
        if kind in lora:
            curve = _mean_energy_curve(lora[kind])
            right.plot(range(1, len(curve) + 1), curve, "--", color=color)
    if lora_rank is None and lora_deltas:
        # Singular values beyond r are float32 rounding noise (~1e-7 of σ_1): count those above 1e-4·σ_1.
        lora_rank = max(int(torch.linalg.matrix_rank(d.float(), rtol=1e-4)) for d in lora_deltas.values())
    if lora:  # legend keys for the line styles of the right panel
        right.plot([], [], "-", color="k", label="full fine-tuning")
        right.plot([], [], "--", color="k", label="LoRA")
    for ax in (left, right):
        if lora_rank:
            ax.axvline(lora_rank, ls=":", color="k", lw=1, label=f"LoRA rank r = {lora_rank}")
        ax.set_xscale("log")
    left.set(yscale="log", xlabel="index i", ylabel="$σ_i / σ_1$", title="Full fine-tuning: singular values of ΔW")
    right.set(xlabel="number of directions k", ylabel="share of $‖ΔW‖_F^2$", ylim=(0, 1.02))
    right.set_title("Energy in the top k directions")
    figure_legend(fig, ncols=5)
    return fig


@readable
def plot_subspace_similarity(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, zoom: int = 8, labels: tuple[str, str] = ("r=8", "r=64")
) -> Figure:
    """Hu et al.'s Figure 3: for each named pair ``(A_small, A_large)`` a heatmap of
    ``φ(A_small, A_large, i, j)`` over all i (rows) and j (columns), then the same zoomed to
    ``i, j ≤ zoom``. One shared colour bar (0 to 1)."""
    if not pairs:
        raise ValueError("plot_subspace_similarity needs at least one (A_small, A_large) pair")
    fig, axes = plt.subplots(1, 2 * len(pairs), figsize=(3 * 2 * len(pairs), 3.4), layout="constrained")
    image = None
    for n, (name, (small, large)) in enumerate(pairs.items()):
        phi = subspace_similarity_matrix(small, large).numpy()
        for ax, part, title in (
            (axes[2 * n], phi, name),
            (axes[2 * n + 1], phi[:zoom, :zoom], f"{name}, i, j ≤ {zoom}"),
        ):
            image = ax.imshow(part, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            rows, cols = part.shape
            ax.set_yticks(range(rows), [str(i + 1) if rows <= 8 or (i + 1) % 2 == 0 else "" for i in range(rows)])
            step = max(1, cols // 8)
            ax.set_xticks(range(step - 1, cols, step), [str(j + 1) for j in range(step - 1, cols, step)])
            ax.set(title=title, xlabel=f"j ({labels[1]})", ylabel=f"i ({labels[0]})")
            ax.tick_params(labelsize=12)  # up to 9 labels on each 2.4-in heatmap
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="φ")
    return fig
