"""Training and measuring: one training loop for pretraining, LoRA and full fine-tuning
(:mod:`~lora_lab.training.loop`), and the metrics every comparison uses — perplexity over
held-out windows and reproducible samples (:mod:`~lora_lab.training.metrics`)."""

from .loop import TrainConfig, TrainHistory, train
from .metrics import generate_samples, mean_loss, perplexity

__all__ = ["TrainConfig", "TrainHistory", "generate_samples", "mean_loss", "perplexity", "train"]
