"""Training and measuring: one training loop for pretraining, LoRA and full fine-tuning
(:mod:`~lora_lab.training.loop`), and the metrics every comparison uses — perplexity over
held-out windows and reproducible samples (:mod:`~lora_lab.training.metrics`); how a step uses its
device (:mod:`~lora_lab.training.compute`) and data-parallel runs under ``torchrun``
(:mod:`~lora_lab.training.distributed`)."""

from . import distributed
from .compute import ComputeSettings
from .loop import TrainConfig, TrainHistory, train
from .metrics import evaluation_windows, generate_samples, mean_loss, perplexity

__all__ = [
    "ComputeSettings",
    "TrainConfig",
    "TrainHistory",
    "distributed",
    "evaluation_windows",
    "generate_samples",
    "mean_loss",
    "perplexity",
    "train",
]
