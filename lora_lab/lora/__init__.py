"""LoRA itself — the lesson.

* :mod:`~lora_lab.lora.layers` — the readable :class:`LoRALayer` (``ΔW = B A`` scaled by α/r)
  and :class:`LoRALinear` (``original_layer(x) + lora(x)``, merge and unmerge);
* :mod:`~lora_lab.lora.fused` — :class:`FusedLoRALinear`, the same function computed fast
  (the default of :func:`apply_lora_to_model`);
* :mod:`~lora_lab.lora.inject` — adapting a whole model: :func:`apply_lora_to_model`,
  :func:`merge_lora`, :func:`disable_lora` and loralib's small API;
* :mod:`~lora_lab.lora.adapters` — adapters on disk in Hugging Face PEFT's format;
* the variants, each beside the plain layer: :mod:`~lora_lab.lora.dora` (DoRA, ``use_dora=True``),
  :mod:`~lora_lab.lora.pissa` (PiSSA, ``init="pissa"``), :mod:`~lora_lab.lora.loraplus` (LoRA+'s
  optimiser groups) and :mod:`~lora_lab.lora.nf4` (a 4-bit NF4 frozen base, QLoRA-style).
* Hugging Face models: :mod:`~lora_lab.lora.conv1d` (:class:`LoRAConv1D` for transformers' ``Conv1D``),
  :mod:`~lora_lab.lora.peft_options` (PEFT's keyword names, ``LoraConfig``, ``"all-linear"``) and
  :mod:`~lora_lab.lora.save_guard` (``save_pretrained`` refused while adapted).
"""

from .adapters import load_adapter, save_adapter
from .conv1d import LoRAConv1D
from .dora import DoRALinear
from .fused import FusedLoRALinear, lora_linear
from .inject import (
    apply_lora_to_model,
    count_parameters,
    disable_lora,
    find_target_modules,
    lora_modules,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_module,
)
from .layers import INIT_METHODS, LoRALayer, LoRALinear
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .nf4 import NF4Linear, quantize_base
from .pissa import pissa_to_lora

__all__ = [
    "INIT_METHODS",
    "DoRALinear",
    "NF4Linear",
    "FusedLoRALinear",
    "LoRAConv1D",
    "LoRALayer",
    "LoRALinear",
    "apply_lora_to_model",
    "count_parameters",
    "create_loraplus_optimizer",
    "disable_lora",
    "find_target_modules",
    "load_adapter",
    "lora_linear",
    "lora_modules",
    "lora_state_dict",
    "loraplus_param_groups",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "pissa_to_lora",
    "quantize_base",
    "replace_module",
    "save_adapter",
]
