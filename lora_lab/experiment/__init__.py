"""The experiment: what the main job (``lora-lab run``) is and how it runs.

* :mod:`~lora_lab.experiment.config` — the nested, typed :class:`Profile` and its named LoRA recipes;
* :mod:`~lora_lab.experiment.stages` — the cached stages: pretrain, LoRA-fine-tune, fully
  fine-tune, evaluate;
* :mod:`~lora_lab.experiment.results` — :class:`RunResults`, the one definition of ``results.json``;
* :mod:`~lora_lab.experiment.run` — the main job end to end, and its claims;
* :mod:`~lora_lab.experiment.report` — the files a run writes;
* :mod:`~lora_lab.experiment.variants` — LoRA's variants compared (``lora-lab variants``), read by
  :mod:`~lora_lab.experiment.variants_report`;
* :mod:`~lora_lab.experiment.rslora_study` — rsLoRA against LoRA, fully trained, over seeds
  (``lora-lab rslora``).
"""

from .config import PROFILES, LoRARecipe, Profile, get_profile
from .results import ModelResult, RunResults
from .stages import Experiment, TrainedModel, prepare

__all__ = [
    "PROFILES",
    "Experiment",
    "LoRARecipe",
    "ModelResult",
    "Profile",
    "RunResults",
    "TrainedModel",
    "get_profile",
    "prepare",
]
