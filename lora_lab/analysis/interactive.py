"""Interactive figures for the notebooks: a slider that redraws a picture, safely.

:func:`image_slider` puts an ``IntSlider`` above an ``ipywidgets.Image``. Each move calls
``draw(value)``, which returns a ``matplotlib.figure.Figure`` made without pyplot, and sends its PNG
to the image in one message. Why not ``interact()`` with ``plt.show()``: with ipykernel 7 the slider's
messages run on a subshell thread while pyplot's global figure state is drawn on, so the first move
after "Restart & Run All" could draw a torn (half-transparent or blank) figure; and the ``Output``
widget that ``interact()`` captures into made nbclient wait after the cell had finished (a graded run
sat until its cell timeout). Here there is no global state and no Output widget.

The cell's output also carries a still PNG of the first picture (and a one-line text): a notebook
opened from its file, whose widgets have no live kernel behind them (JupyterLab renders widgets only
in trusted, running notebooks), shows that picture instead of the widget's raw ``repr``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

from matplotlib.figure import Figure

__all__ = ["figure_png", "image_slider"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """``fig`` rendered as PNG bytes (on its own Agg canvas: pyplot's state is neither used nor changed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def image_slider(draw: Callable[[int], Figure], *, value: int, min: int, max: int, description: str = "") -> object:
    """Display a slider over ``min..max`` (starting at ``value``) above the picture ``draw(value)``,
    redrawn when the slider is released; return the widget (an ``ipywidgets.VBox``).

    ``draw`` must build a new ``Figure`` without pyplot (``Figure()``, then ``fig.subplots``).
    """
    import ipywidgets as widgets  # only the notebooks need it
    from IPython.display import display

    if not min <= value <= max:
        raise ValueError(f"the slider's start value {value} is outside its range {min}..{max}")
    slider = widgets.IntSlider(value=value, min=min, max=max, continuous_update=False, description=description)
    still = figure_png(draw(value))
    picture = widgets.Image(value=still, format="png")

    def redraw(change: dict) -> None:
        picture.value = figure_png(draw(change["new"]))

    slider.observe(redraw, names="value")
    box = widgets.VBox([slider, picture])
    bundle = {
        WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": box.model_id},
        "image/png": base64.b64encode(still).decode("ascii"),  # what a notebook opened from its file shows
        "text/plain": f"[a slider for {description or 'the value'} from {min} to {max}: run the cell to move it]",
    }
    display(bundle, raw=True)
    return box
