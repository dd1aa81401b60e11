"""The project's single seed helper.

Same seed, same machine and same thread count give bit-identical runs on the CPU: every
random number in lora_lab comes from the global generators seeded here, from an explicit
``torch.Generator`` (:func:`make_generator`; the exercise checks seed their own), or from
the built-in corpus's private ``random.Random``, seeded from the corpus's own seed. On a
GPU, ``deterministic`` asks for deterministic kernels but only warns where none exists.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "make_generator", "derived_seed"]


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (CPU and all GPUs) from one integer.

    With ``deterministic=True`` PyTorch is also asked to use deterministic kernels where it
    has them (``warn_only`` so that an op without a deterministic variant still runs).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic GEMMs; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A private ``torch.Generator`` seeded with ``seed``: draws from it do not disturb,
    and are not disturbed by, the global generator."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def derived_seed(seed: int, *labels: str | int) -> int:
    """A seed for one named stream under ``seed``: ``derived_seed(0, "source", 2)`` for the third
    source-domain prompt, say. Different labels give unrelated seeds (a SHA-256 of seed and
    labels), so two streams never share random numbers, as ``seed + i`` for the i-th prompt of
    two lists would; the same labels always give the same seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not labels or not all(isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels):
        raise TypeError(f"derived_seed needs one or more str or int labels, got {labels!r}")
    blob = "\x1f".join(map(str, (seed, *labels))).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1  # < 2**63: fits torch's seeds
