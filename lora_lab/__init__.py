"""lora_lab: learn LoRA (Hu et al. 2021) by building it, training it and measuring it.

The course's API, as the original course module wrote it::

    from lora_lab import LoRALayer, LoRALinear, apply_lora_to_model
    lora_model = apply_lora_to_model(model, rank=4, alpha=1.0)  # a copy; model is untouched

Where things are:

* ``lora_lab.lora`` — LoRA itself, the lesson: layers, the fused fast path, injection, adapters;
* ``lora_lab.model`` — the small GPT and its checkpoints; ``lora_lab.data`` — corpora, splits;
* ``lora_lab.training`` — the training loop and the metrics (perplexity, samples);
* ``lora_lab.experiment`` — the main job: its configuration, cached stages, typed results;
* ``lora_lab.analysis`` — sweeps, the low-rank analysis of ΔW, figures;
* ``lora_lab.checks`` — the graders of the notebooks' exercises.
* ``lora_lab.export`` — the GPT and its adapters in Hugging Face transformers' format (imported on its own:
  it needs transformers when an export runs).
"""

from .lora import (
    FusedLoRALinear,
    LoRALayer,
    LoRALinear,
    apply_lora_to_model,
    count_parameters,
    disable_lora,
    find_target_modules,
    load_adapter,
    lora_modules,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    save_adapter,
)
from .model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from .runtime import select_device
from .seeding import make_generator, seed_everything

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "FusedLoRALinear",
    "GPTConfig",
    "LoRALayer",
    "LoRALinear",
    "apply_lora_to_model",
    "count_parameters",
    "disable_lora",
    "find_target_modules",
    "load_adapter",
    "load_checkpoint",
    "lora_modules",
    "lora_state_dict",
    "make_generator",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "save_adapter",
    "save_checkpoint",
    "seed_everything",
    "select_device",
]
