"""Notebook 03's graders: the training loop and perplexity, on the reference solutions and on each
typical mistake (the hint must name it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lora_lab.checks import check_perplexity, check_training_loop
from lora_lab.checks.grading import grade
from lora_lab.checks.training import package_losses, reference_loop
from lora_lab.data import iterate_batches
from lora_lab.model import GPT, GPTConfig
from lora_lab.training import evaluation_windows


def make_loop(*, pass_lr=True, unfreeze=False, **flags):
    """The exercise's solution (the grader's reference loop, itself checked against train below), or
    it with one typical mistake: ``flags`` as :func:`reference_loop`'s, AdamW's default lr, every
    parameter unfrozen."""

    def train_loop(model, data, block_size, batch_size, epochs, lr, seed):
        if unfreeze:
            for p in model.parameters():
                p.requires_grad_(True)
        return reference_loop(model, data, block_size=block_size, batch_size=batch_size, epochs=epochs,
                              lr=lr if pass_lr else 1e-3, seed=seed, **flags)  # fmt: skip

    return train_loop


def all_parameters_loop(model, data, block_size, batch_size, epochs, lr, seed):
    """A correct loop that hands AdamW every parameter: frozen ones get no gradient, so AdamW skips them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    model.train()
    for x, y in iterate_batches(data, block_size, batch_size, epochs, seed):
        loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_reference_loop_is_the_packages_loop_bit_for_bit():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=16))
    data = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(1))
    settings = {"block_size": 8, "batch_size": 4, "epochs": 2.0, "lr": 3e-3, "seed": 5}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert reference_loop(a, data, **settings) == package_losses(b, data, **settings)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_check_training_loop_passes_the_solution(capsys):
    result = check_training_loop(make_loop())
    assert result and len(result.passed) == 2, result.report()
    assert "All 2 passed." in capsys.readouterr().out
    grade("check_training_loop", make_loop())  # the hidden test's call does not raise either
    # Handing AdamW every parameter is harmless: frozen ones get no gradient, so AdamW skips them.
    assert check_training_loop(all_parameters_loop)


@pytest.mark.parametrize(
    "mistake, words",
    [
        ({"zero_grad": False}, "zero_grad is missing"),
        ({"step": False}, "optimizer.step() is missing"),
        ({"clip": False}, "not clipped"),
        ({"shift": False}, "inputs x, not the next tokens y"),
        ({"weight_decay": 0.01}, "weight_decay=0.01"),
        ({"pass_lr": False}, "AdamW's default 1e-3"),
        ({"unfreeze": True}, "require gradients"),
    ],
)
def test_check_training_loop_names_each_mistake(mistake, words):
    result = check_training_loop(make_loop(**mistake))
    assert not result
    assert words in result.diagnosis().replace("\n", " ").replace("        ", ""), result.diagnosis()
    with pytest.raises(AssertionError, match="check_training_loop"):
        grade("check_training_loop", make_loop(**mistake))


def test_check_training_loop_reports_wrong_returns():
    assert "tensors" in check_training_loop(lambda m, d, **k: [torch.tensor(1.0)] * 26).diagnosis()
    assert "not a list" in check_training_loop(lambda m, d, **k: 1.0).diagnosis()
    assert "one per batch" in check_training_loop(lambda m, d, **k: [1.0]).diagnosis()
    stub = check_training_loop(lambda *a, **k: (_ for _ in ()).throw(NotImplementedError()))
    assert "not written yet" in stub.failed[0][0]


def make_perplexity(*, eval_mode=True, no_grad=True, per_window=False, every=False, summed=False, take_exp=True):
    """Exercise 03.2's solution, or it with one typical mistake."""

    def my_perplexity(model, data, block_size):
        if eval_mode:
            model.eval()
        size = min(block_size, len(data) - 1)
        total, count, means = 0.0, 0, []
        with torch.set_grad_enabled(not no_grad):
            for start, first in evaluation_windows(len(data), block_size):
                tokens = data[start : start + size + 1][None]
                logits, _ = model(tokens[:, :-1])
                nll = F.cross_entropy(logits[0], tokens[0, 1:], reduction="none").double()
                kept = nll if every else nll[first:]
                total += kept.sum().item()
                count += len(kept)
                means.append(kept.mean().item())
        mean = sum(means) / len(means) if per_window else total / count
        if summed:
            return math.exp(min(total, 700))
        return math.exp(mean) if take_exp else mean

    return my_perplexity


def test_check_perplexity_passes_the_solution():
    result = check_perplexity(make_perplexity())
    assert result and len(result.passed) == 3, result.report()
    grade("check_perplexity", make_perplexity())


@pytest.mark.parametrize(
    "mistake, words",
    [
        ({"eval_mode": False}, "model.eval()"),
        ({"no_grad": False}, "torch.no_grad()"),
        ({"per_window": True}, "averaged per window"),
        ({"every": True}, "overlaps count twice"),
        ({"summed": True}, "summed NLL"),
        ({"take_exp": False}, "not its exp"),
    ],
)
def test_check_perplexity_names_each_mistake(mistake, words):
    result = check_perplexity(make_perplexity(**mistake))
    assert not result
    assert words in result.diagnosis().replace("\n", " ").replace("        ", ""), result.diagnosis()


def test_check_perplexity_reports_wrong_returns():
    assert "not a number" in check_perplexity(lambda m, d, b: "1.5").diagnosis()
    assert "never called the model" in check_perplexity(lambda m, d, b: 1.5).diagnosis()
