"""lora_lab.analysis.interactive: the slider that redraws a picture without pyplot."""

from __future__ import annotations

import base64

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from lora_lab.analysis import interactive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _draw(value: int) -> Figure:
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot(range(value + 2))
    return fig


def test_image_slider_redraws_the_picture_and_displays_a_still_fallback(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda bundle, raw: shown.append((bundle, raw)))
    figures_before = plt.get_fignums()
    box = interactive.image_slider(_draw, value=3, min=1, max=9, description="n")
    slider, picture = box.children
    first = bytes(picture.value)  # the widget keeps a memoryview
    assert first.startswith(PNG_MAGIC) and first == interactive.figure_png(_draw(3))
    slider.value = 7  # what a move of the slider does
    assert bytes(picture.value) == interactive.figure_png(_draw(7)) != first
    ((bundle, raw),) = shown
    assert raw and bundle[interactive.WIDGET_VIEW]["model_id"] == box.model_id
    assert base64.b64decode(bundle["image/png"]) == first  # a notebook opened from its file shows this
    assert "children" not in bundle["text/plain"]
    assert plt.get_fignums() == figures_before  # pyplot's global state is not touched
    box.close_all()


def test_image_slider_refuses_a_start_value_out_of_range():
    with pytest.raises(ValueError, match="outside its range 1..9"):
        interactive.image_slider(_draw, value=0, min=1, max=9)
