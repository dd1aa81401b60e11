"""lora_lab: learn LoRA (Hu et al. 2021) by building it, training it and measuring it.

The seed's API, as the original course module wrote it::

    from lora_lab import LoRALayer, LoRALinear, apply_lora_to_model
    lora_model = apply_lora_to_model(model, rank=4, alpha=1.0)  # a copy; model is untouched
"""

__version__ = "0.1.0"

from .adapters import load_adapter, save_adapter  # noqa: E402
from .inject import (  # noqa: E402
    apply_lora_to_model,
    count_parameters,
    disable_lora,
    find_target_modules,
    lora_modules,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
)
from .layers import LoRALayer, LoRALinear  # noqa: E402
from .model import GPT, GPTConfig, load_checkpoint, save_checkpoint, select_device  # noqa: E402
from .seeding import make_generator, seed_everything  # noqa: E402

__all__ = [
    "GPT",
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
