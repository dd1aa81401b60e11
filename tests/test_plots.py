"""The report figures stay legible: nothing overlaps and no text prints below ~8 pt in the PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib import pyplot as plt
from matplotlib.text import Text

from lora_lab.plots import FONT_SIZES, _log_ticks, plot_loss_curves, plot_perplexities
from lora_lab.train import TrainResult

FLOORS = {"target": 1.577, "source": 1.679}


def _models(target: list[float], source: list[float]) -> dict[str, dict]:
    names = ("base", "lora_seed", "lora", "full")
    return {n: {"target_ppl": t, "source_ppl": s} for n, t, s in zip(names, target, source)}


def _visible_texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize(
    "target, source",
    [
        ([47.238, 3.817, 1.617, 1.611], [1.690, 2.449, 5.987, 6.759]),  # the snapshot's numbers
        ([1.60, 1.59, 1.58, 1.59], [1.70, 1.69, 1.68, 1.70]),  # everything on the floor
        ([400.0, 1.5, 1.5, 1.5], [1.68, 300.0, 1.7, 1.7]),  # bars over two decades
    ],
)
def test_perplexity_labels_clear_the_legend_and_the_titles(target, source):
    fig = plot_perplexities(_models(target, source), FLOORS)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))
        title_box = ax.title.get_window_extent(renderer)
        assert len(ax.texts) == 4  # one value label per bar
        for label in ax.texts:
            box = label.get_window_extent(renderer)
            assert not box.overlaps(legend_box) and not box.overlaps(title_box)
            assert box.y1 <= ax.get_window_extent(renderer).y1  # inside the axes, under the title
    plt.close(fig)


def test_report_figures_use_print_sized_fonts():
    history = TrainResult([3.0, 2.0, 1.0], [(0, 3.0), (2, 1.0)], 1.0, 3)
    figures = [
        plot_perplexities(_models([47.2, 3.8, 1.62, 1.61], [1.69, 2.45, 5.99, 6.76]), FLOORS),
        plot_loss_curves({"base": history, "lora": history}, FLOORS),
    ]
    for fig in figures:
        fig.canvas.draw()  # tick labels are made while drawing
        sizes = {t.get_fontsize() for t in _visible_texts(fig)}
        assert min(sizes) >= FONT_SIZES["font.size"], sizes
        assert fig.legends and all(not ax.get_legend() for ax in fig.axes)  # legend outside the panels
        plt.close(fig)
    assert plt.rcParams["font.size"] == 10  # the sizes apply only while a figure is drawn


def test_log_ticks_are_round_and_few():
    assert _log_ticks(1.5, 60) == [2, 5, 10, 20, 50]  # 1-1.5-2-3-5-7 would give 10 ticks: thinned to 1-2-5
    assert _log_ticks(1.5, 8) == [1.5, 2, 3, 5, 7]
    assert 2 <= len(_log_ticks(1.60, 1.71)) <= 5 and all(1.60 <= t <= 1.71 for t in _log_ticks(1.60, 1.71))
