"""Measuring a character model: perplexity and samples.

Perplexity is ``exp`` of the mean negative log-likelihood per character over a held-out
split. Windows are deterministic and overlap by half: every scored character (but those of
the first window) sees at least ``block_size / 2`` characters of context, so the number
measures the model rather than how often it was cut off from its context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..seeding import derived_seed

__all__ = ["evaluation_windows", "mean_loss", "perplexity", "generate_samples"]


def evaluation_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """The windows :func:`mean_loss` scores over ``n_tokens`` tokens: ``(start, first)`` pairs.

    Each window holds ``size + 1`` tokens from ``start`` (``size = min(block_size, n_tokens - 1)``):
    ``size`` inputs and their ``size`` next tokens. Windows start every ``size // 2`` tokens (the
    last one is moved back to end at the data's end), and window ``(start, first)`` scores only its
    targets from offset ``first`` on, those no earlier window scored: every target exactly once."""
    if n_tokens < 2:
        raise ValueError("evaluation needs at least two tokens (one input and its next token)")
    size = min(block_size, n_tokens - 1)
    stride = max(1, size // 2)
    windows = [(0, 0)]
    scored_until = size  # positions 1..size (targets) are scored by the first window
    start = stride
    while scored_until < n_tokens - 1:
        start = min(start, n_tokens - 1 - size)
        end = start + size
        windows.append((start, scored_until - start))
        scored_until = end
        start += stride
    return windows


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    data: torch.Tensor,
    block_size: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    max_windows: int | None = None,
) -> float:
    """Mean next-token cross-entropy (nats per token) over ``data``, every target scored
    once. ``max_windows`` evaluates an evenly spaced, deterministic subset (for quick
    estimates during training)."""
    windows = evaluation_windows(len(data), block_size)
    if max_windows is not None and len(windows) > max_windows:
        step = len(windows) / max_windows
        windows = [windows[int(i * step)] for i in range(max_windows)]
    size = min(block_size, len(data) - 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            index = torch.tensor([s for s, _ in chunk])[:, None] + torch.arange(size + 1)
            tokens = data[index].to(device)
            logits, _ = model(tokens[:, :-1])
            nll = F.cross_entropy(logits.transpose(1, 2).float(), tokens[:, 1:], reduction="none")
            for row, (_, first) in enumerate(chunk):
                total += nll[row, first:].double().sum().item()
                count += size - first
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, data: torch.Tensor, block_size: int, **kwargs) -> float:
    """``exp(mean NLL per character)`` over ``data`` (see :func:`mean_loss`)."""
    return math.exp(mean_loss(model, data, block_size, **kwargs))


def generate_samples(
    model: nn.Module,
    tokenizer,
    prompts: list[str] | tuple[str, ...],
    *,
    max_new_tokens: int = 120,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    domain: str | None = None,
    progress: bool = False,
) -> list[str]:
    """One continuation per prompt (prompt included), reproducible from ``seed``: prompt
    ``i`` is sampled with seed ``seed + i`` so adding a prompt does not change the others.

    Given a ``domain`` (a label such as ``"source"``), prompt ``i`` is sampled with
    :func:`lora_lab.seeding.derived_seed` ``(seed, domain, i)`` instead, so that the prompts of
    two domains sampled with one ``seed`` draw different random numbers (with ``seed + i`` the
    i-th prompt of each list would share them, and two lists of equal prompts give equal text).
    ``progress=True`` shows a bar over the prompts (gone when done), for long generations."""
    samples = []
    for i, prompt in enumerate(tqdm(prompts, desc="sampling", unit="prompt", disable=not progress, leave=False)):
        idx = tokenizer.encode(prompt)[None, :].to(device)
        prompt_seed = seed + i if domain is None else derived_seed(seed, domain, i)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=prompt_seed)
        samples.append(tokenizer.decode(out[0]))
    return samples
