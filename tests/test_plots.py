"""The report figures stay legible: nothing overlaps and no text prints below ~8 pt in the PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import re
from pathlib import Path

import pytest
import torch
from matplotlib import pyplot as plt
from matplotlib.text import Text

from lora_lab.analysis import (
    LABELS,
    MODEL_COLORS,
    TICK_LABELS,
    plot_loss_curves,
    plot_perplexities,
    plot_rank_sweep,
    plot_spectrum,
)
from lora_lab.analysis.figures import _log_ticks
from lora_lab.experiment.config import PROFILES
from lora_lab.training import TrainHistory

FLOORS = {"target": 1.577, "source": 1.679}


def _models(target: list[float], source: list[float]) -> dict[str, dict]:
    names = ("base", "lora_course", "lora", "full") if len(target) == 4 else ("base", "lora_course", "lora_course_5ep",
                                                                             "lora", "full")  # fmt: skip
    return {n: {"target_ppl": t, "source_ppl": s} for n, t, s in zip(names, target, source)}


def test_every_model_of_every_profile_has_a_colour_and_labels():
    for profile in PROFILES.values():
        names = {"base", "full", *(recipe.name for recipe in profile.recipes)}
        assert names <= set(MODEL_COLORS) and names <= set(LABELS) and names <= set(TICK_LABELS), profile.name
    assert LABELS["lora_course"] == "LoRA, course recipe" and TICK_LABELS["lora_course"] == "LoRA\n(course)"


def _visible_texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize(
    "target, source",
    [
        ([47.238, 3.817, 1.617, 1.611], [1.690, 2.449, 5.987, 6.759]),  # the snapshot's numbers
        ([1.60, 1.59, 1.58, 1.59], [1.70, 1.69, 1.68, 1.70]),  # everything on the floor
        ([400.0, 1.5, 1.5, 1.5], [1.68, 300.0, 1.7, 1.7]),  # bars over two decades
        # the 3-seed snapshot's first seed, five models: two neighbours' labels at one height
        ([45.851, 2.590, 9.774, 1.613, 1.631], [1.696, 2.777, 2.244, 7.381, 9.987]),
    ],
)
def test_perplexity_labels_clear_each_other_and_the_titles(target, source):
    """With the floors known, each model is a dot at its excess loss, labelled above it; the labels
    stay inside their panel, under its title, and never cover one another, nor do the tick labels
    ("LoRA (tuned)" beside "full fine-tuning")."""
    fig = plot_perplexities(_models(target, source), FLOORS)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    for ax in fig.axes:
        title_box = ax.title.get_window_extent(renderer)
        assert len(ax.texts) == len(target)  # one value label per model
        boxes = [label.get_window_extent(renderer) for label in ax.texts]
        for i, box in enumerate(boxes):
            assert not box.overlaps(title_box)
            assert box.y1 <= ax.get_window_extent(renderer).y1  # inside the axes, under the title
            assert not any(box.overlaps(other) for other in boxes[i + 1 :])
        ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(ticks) == len(target)
        assert not any(a.overlaps(b) for i, a in enumerate(ticks) for b in ticks[i + 1 :])
        assert not any(tick.overlaps(panel) for tick in ticks for panel in panels)  # not into the panel below
    plt.close(fig)


def test_perplexities_plot_the_excess_loss_over_the_floor():
    """The dots sit at ln ppl - ln floor (nats/char), on a log axis; a model below the floor, which
    a log axis cannot show, switches the panel to a linear axis whose title says so."""
    import math

    target, source = [47.2, 3.8, 1.62, 1.61], [1.69, 2.45, 5.99, 6.76]
    fig = plot_perplexities(_models(target, source), FLOORS)
    for ax, split, values in zip(fig.axes, ("target", "source"), (target, source)):
        (dots,) = ax.collections
        expected = [math.log(v) - math.log(FLOORS[split]) for v in values]
        assert [y for _, y in dots.get_offsets()] == pytest.approx(expected)
        assert ax.get_yscale() == "log"
    plt.close(fig)
    fig = plot_perplexities(_models([1.5, 1.7, 1.6, 1.6], source), FLOORS)  # the base model below the floor
    assert fig.axes[0].get_yscale() == "linear" and "BELOW the floor" in fig.axes[0].get_title()
    assert fig.axes[1].get_yscale() == "log"
    plt.close(fig)
    fig = plot_perplexities(_models(target, source))  # no floors: perplexities on a log axis, as bars
    assert all(ax.get_yscale() == "log" and len(ax.patches) == 4 for ax in fig.axes)
    plt.close(fig)


def test_coinciding_lines_stay_visible():
    """Tuned LoRA and full fine-tuning can end within a percent of each other: full fine-tuning is
    drawn wide and translucent underneath, LoRA thin, with markers or a dash pattern, on top, so
    neither legend entry names an invisible line."""
    history = TrainHistory([3.0, 2.0, 1.0], [(0, 3.0), (1, 2.0), (2, 1.0)], 1.0, 3)
    fig = plot_loss_curves({"lora": history, "full": history}, FLOORS)
    right = fig.axes[1]
    lines = {line.get_label(): line for line in right.get_lines()}
    lora, full = lines[LABELS["lora"]], lines[LABELS["full"]]
    assert lora.get_zorder() > full.get_zorder() and lora.get_linewidth() < full.get_linewidth()
    assert lora.get_marker() not in (None, "None", "") or lora.get_linestyle() != full.get_linestyle()
    assert full.get_alpha() is not None and full.get_alpha() < 1
    plt.close(fig)
    runs = [{"rank": r, "alpha": 16.0, "target_ppl": 3.0, "source_ppl": 2.5} for r in (1, 2)]
    reference = {"lora": {"target_ppl": 1.62, "source_ppl": 2.0}, "full": {"target_ppl": 1.62, "source_ppl": 2.0}}
    fig = plot_rank_sweep(runs, reference, FLOORS)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    lora, full = lines[LABELS["lora"]], lines[LABELS["full"]]
    assert lora.get_zorder() > full.get_zorder() and lora.get_linewidth() < full.get_linewidth()
    assert lora.get_linestyle() != full.get_linestyle()
    plt.close(fig)


def test_fine_tuning_curves_show_the_loss_above_the_floor():
    """Runs ending a hundredth of a nat apart near the floor would share one line on a linear axis:
    with the target's floor known, the fine-tuning panel plots loss - ln floor on a log axis; a run
    at or below the floor (which a log axis cannot show) brings back the linear axis and the line."""
    import math

    floor = math.log(FLOORS["target"])
    lora = TrainHistory([3.0, 1.0], [(0, 3.0), (10, floor + 0.023)], 1.0, 10)
    full = TrainHistory([3.0, 1.0], [(0, 3.0), (10, floor + 0.034)], 1.0, 10)
    fig = plot_loss_curves({"lora": lora, "full": full}, FLOORS)
    right = fig.axes[1]
    lines = {line.get_label(): line for line in right.get_lines()}
    assert right.get_yscale() == "log" and "entropy floor" not in lines
    assert list(lines[LABELS["lora"]].get_ydata()) == pytest.approx([3.0 - floor, 0.023])
    assert list(lines[LABELS["full"]].get_ydata()) == pytest.approx([3.0 - floor, 0.034])
    plt.close(fig)
    below = TrainHistory([3.0, 1.0], [(0, 3.0), (10, floor - 0.01)], 1.0, 10)
    fig = plot_loss_curves({"lora": below, "full": full}, FLOORS)
    right = fig.axes[1]
    assert right.get_yscale() == "linear" and "entropy floor" in [line.get_label() for line in right.get_lines()]
    plt.close(fig)


def test_rank_sweep_marks_the_tuned_run_at_its_rank():
    """The tuned LoRA run ends within a percent of full fine-tuning: given its rank it is a star at
    (rank, perplexity) over full fine-tuning's band, and its legend entry says it is fully trained."""
    runs = [{"rank": r, "alpha": 32.0, "target_ppl": 3.0 - 0.1 * r, "source_ppl": 2.5} for r in (1, 4, 16)]
    reference = {"lora": {"target_ppl": 1.615, "source_ppl": 2.4}, "full": {"target_ppl": 1.629, "source_ppl": 2.6}}
    fig = plot_rank_sweep(runs, reference, FLOORS, lora_rank=16)
    star = next(line for line in fig.axes[0].get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [16] and list(star.get_ydata()) == [1.615]
    assert "r = 16" in star.get_label() and star.get_zorder() > 1
    plt.close(fig)


def _paper_text_width_inches() -> float:
    """The companion PDF's text width, read from its page setup (A4, side margins)."""
    main = (Path(__file__).resolve().parents[1] / "paper" / "main.typ").read_text(encoding="utf-8")
    assert re.search(r'paper:\s*"a4"', main), "the paper is no longer A4: update this test's page width"
    margin_cm = float(re.search(r"margin:\s*\(x:\s*([\d.]+)cm", main)[1])
    return (21.0 - 2 * margin_cm) / 2.54


def test_report_figures_print_at_8_pt_or_more():
    """The PDF places every figure at its full text width, so a text of s pt in a figure w inches
    wide prints at s · text width / w pt."""
    history = TrainHistory([3.0, 2.0, 1.0], [(0, 3.0), (2, 1.0)], 1.0, 3)
    runs = [
        {"rank": r, "alpha": 16.0, "target_ppl": 3.0 - 0.1 * r, "source_ppl": 2.5, "trainable_params": 100 * r}
        for r in (1, 2, 4)
    ]
    generator = torch.Generator().manual_seed(0)
    deltas = {f"blocks.{i}.attn.q": torch.randn(16, 16, generator=generator) for i in range(2)}
    figures = [
        plot_perplexities(_models([47.2, 3.8, 1.62, 1.61], [1.69, 2.45, 5.99, 6.76]), FLOORS),
        plot_loss_curves({"base": history, "lora": history}, FLOORS),
        plot_rank_sweep(runs, {"base": {"target_ppl": 4.0, "source_ppl": 2.4}}, FLOORS),
        plot_spectrum(deltas, deltas),
    ]
    text_width = _paper_text_width_inches()
    for fig in figures:
        fig.canvas.draw()  # tick labels are made while drawing
        smallest = min(t.get_fontsize() for t in _visible_texts(fig))
        printed = smallest * text_width / fig.get_size_inches()[0]
        assert printed >= 7.9, f"{smallest} pt in a {fig.get_size_inches()[0]} in figure prints at {printed:.1f} pt"
        assert all(not ax.get_legend() for ax in fig.axes)  # a legend, when there is one, sits outside the panels
        plt.close(fig)
    assert plt.rcParams["font.size"] == 10  # the sizes apply only while a figure is drawn


def test_log_ticks_are_round_and_few():
    assert _log_ticks(1.5, 60) == [2, 5, 10, 20, 50]  # 1-1.5-2-3-5-7 would give 10 ticks: thinned to 1-2-5
    assert _log_ticks(1.5, 8) == [1.5, 2, 3, 5, 7]
    assert 2 <= len(_log_ticks(1.60, 1.71)) <= 5 and all(1.60 <= t <= 1.71 for t in _log_ticks(1.60, 1.71))
