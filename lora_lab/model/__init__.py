"""The model: the series' small GPT (:mod:`~lora_lab.model.gpt`, one readable file after
nanoGPT) and its checkpoints (:mod:`~lora_lab.model.checkpoint`, safetensors with the config
inside). Nothing here knows about LoRA: adapters wrap this model from :mod:`lora_lab.lora`.
"""

from .checkpoint import CONFIG_METADATA_KEY, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .gpt import GPT, GPTConfig, KVCache, causal_mask, parameter_count, parameter_shapes

__all__ = [
    "CONFIG_METADATA_KEY",
    "GPT",
    "GPTConfig",
    "KVCache",
    "causal_mask",
    "load_checkpoint",
    "parameter_count",
    "parameter_shapes",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
