"""LoRA against full fine-tuning, looked at closely — and the figures that show it.

* :mod:`~lora_lab.analysis.sweeps` — rank, α and target-module sweeps of the tuned recipe
  (:func:`rank_sweep`, :func:`alpha_sweep`, :func:`target_sweep`, :func:`sweep_table`) and the
  files they leave for the companion PDF (:func:`write_sweep_outputs`, :func:`analyse_run`);
* :mod:`~lora_lab.analysis.ablations` — fair comparisons at the headline budget: each method's
  learning rate from one sweep (:func:`lr_sweep`, :func:`best_lr`, :func:`select_lrs`; its file
  read by :func:`read_lr_selection` and drawn by :func:`plot_lr_frontier`), the
  tuned recipe taken apart (:func:`recipe_ablation`), rsLoRA at a matched step
  (:func:`rslora_comparison`), target modules at an equal parameter budget
  (:func:`budget_matched_targets`);
* :mod:`~lora_lab.analysis.update_speed` — ‖ΔW x‖ measured after a few steps across r, α and lr
  (:func:`update_growth`): what the update's speed follows;
* :mod:`~lora_lab.analysis.context` — whether the model's window sees what the entropy floor
  assumes (:func:`window_reach`);
* :mod:`~lora_lab.analysis.low_rank` — the update ``ΔW`` fine-tuning learned
  (:func:`delta_weights`), how low-rank it is (:func:`singular_values`, :func:`effective_rank`,
  :func:`energy_captured`) and Hu et al.'s subspace similarity between adapters
  (:func:`subspace_similarity`);
* :mod:`~lora_lab.analysis.memory` — the training state's memory under AdamW
  (:func:`optimizer_memory_bytes`) and the comparison table of the measured models;
* :mod:`~lora_lab.analysis.figures` — every figure of the report, the notebooks and the PDF, and
  the style they share (:data:`MODEL_COLORS`, :data:`LABELS`, :func:`readable`).
* :mod:`~lora_lab.analysis.interactive` — the notebooks' slider that redraws a picture
  (:func:`~lora_lab.analysis.interactive.image_slider`; imported from there, it needs ipywidgets).

Everything public is importable from here (``from lora_lab.analysis import rank_sweep``).
"""

from . import ablations, context, figures, low_rank, memory, sweeps, update_speed
from .ablations import *  # noqa: F403
from .context import *  # noqa: F403
from .figures import *  # noqa: F403
from .low_rank import *  # noqa: F403
from .memory import *  # noqa: F403
from .sweeps import *  # noqa: F403
from .update_speed import *  # noqa: F403

# Each module's __all__ is the one list of its public names; this package re-exports them all.
__all__ = [
    *sweeps.__all__, *ablations.__all__, *update_speed.__all__, *context.__all__, *low_rank.__all__,
    *memory.__all__, *figures.__all__,
]  # fmt: skip
