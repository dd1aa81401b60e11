"""Token batches for training: deterministic epochs of random windows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..seeding import make_generator

__all__ = ["iterate_batches", "steps_per_epoch", "total_steps"]


def steps_per_epoch(n_tokens: int, block_size: int, batch_size: int) -> int:
    """Batches needed to show every window of ``block_size`` tokens once."""
    windows = (n_tokens - 1) // block_size
    if windows < 1:
        raise ValueError(f"{n_tokens} tokens hold no training window of {block_size + 1}")
    return math.ceil(windows / batch_size)


def iterate_batches(
    data: torch.Tensor, block_size: int, batch_size: int, epochs: float, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic epochs of ``(x, y)`` batches, ``y`` being ``x`` shifted by one token.

    Each epoch cuts the data into non-overlapping windows from a random offset and visits
    them in a random order, so one epoch shows (almost) every token once, as the course's
    "epochs" mean. A fractional ``epochs`` stops part-way through the last one. All
    randomness comes from ``seed``.
    """
    per_epoch = steps_per_epoch(len(data), block_size, batch_size)
    total = max(1, round(epochs * per_epoch))
    generator = make_generator(seed)
    step = 0
    while step < total:
        offset = int(torch.randint(0, block_size, (1,), generator=generator))
        starts = torch.arange(offset, len(data) - block_size, block_size)
        if len(starts) == 0:  # the data holds exactly one window: the offset must be 0
            starts = torch.zeros(1, dtype=torch.long)
        starts = starts[torch.randperm(len(starts), generator=generator)]
        for i in range(0, len(starts), batch_size):
            if step == total:
                return
            batch = starts[i : i + batch_size]
            index = batch[:, None] + torch.arange(block_size + 1)
            windows = data[index]
            yield windows[:, :-1], windows[:, 1:]
            step += 1


def total_steps(n_tokens: int, block_size: int, batch_size: int, epochs: float) -> int:
    """How many batches :func:`iterate_batches` yields."""
    return max(1, round(epochs * steps_per_epoch(n_tokens, block_size, batch_size)))
