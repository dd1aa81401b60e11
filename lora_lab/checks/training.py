"""Graders of notebook 03's exercises: the training loop, and perplexity over held-out windows.

Both run the student's function on tiny GPTs of their own (a vocabulary of 7, windows of 8) and
compare it with the package: ``check_training_loop`` with :func:`lora_lab.training.train` at a
constant learning rate (no warm-up, no decay), whose losses a correct loop reproduces bit for bit
on a CPU; ``check_perplexity`` with :func:`lora_lab.training.perplexity`. A mismatch is compared
with the typical mistakes, each replayed here, so that the hint names the one that was made.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import iterate_batches, total_steps
from ..lora import apply_lora_to_model
from ..model import GPT, GPTConfig
from ..training.loop import TrainConfig, train
from ..training.metrics import evaluation_windows, perplexity
from .result import CheckResult, _attempt, _is_number, _run_check, _scalar, _title

_VOCAB, _BLOCK = 7, 8
_LOOP = {"block_size": _BLOCK, "batch_size": 4, "epochs": 2.0, "lr": 3e-3, "seed": 5}
_LOSS_TOL = 1e-5  # a correct loop matches to the last bit on a CPU; the tolerance only absorbs another op order


def _tiny_gpt(dropout: float = 0.0) -> GPT:
    config = GPTConfig(vocab_size=_VOCAB, block_size=_BLOCK, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
    return GPT(config)


def _tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, _VOCAB, (n,), generator=generator)


def reference_loop(
    model: nn.Module,
    data: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    epochs: float,
    lr: float,
    seed: int,
    zero_grad: bool = True,
    step: bool = True,
    clip: bool = True,
    shift: bool = True,
    weight_decay: float = 0.0,
) -> list[float]:
    """The loop exercise 03.1 asks for; the keyword flags replay its typical mistakes (no
    ``zero_grad``, no ``step``, no clipping, the inputs as targets, AdamW's default decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for x, y in iterate_batches(data, block_size, batch_size, epochs, seed):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), (y if shift else x).reshape(-1))
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        if step:
            optimizer.step()
        losses.append(loss.item())
    return losses


def package_losses(model: nn.Module, data: torch.Tensor, *, block_size: int, batch_size: int, epochs: float,
                   lr: float, seed: int) -> list[float]:  # fmt: skip
    """:func:`lora_lab.training.train`'s per-step losses for ``model`` (trained in place) at a
    constant ``lr``: no warm-up, no decay, gradients clipped to norm 1, no weight decay."""
    config = TrainConfig(epochs, lr, batch_size, warmup_fraction=0.0, min_lr_fraction=1.0, seed=seed)
    return train(model, data, None, config, block_size=block_size, progress=False).train_loss


def check_training_loop(fn: Callable[..., list[float]]) -> CheckResult:
    """Check ``fn(model, data, block_size=, batch_size=, epochs=, lr=, seed=)``: AdamW (no weight
    decay) over the parameters that require gradients, one step per batch of
    ``iterate_batches(data, block_size, batch_size, epochs, seed)`` with the next-token loss,
    ``zero_grad``, ``backward``, gradients clipped to norm 1, ``step``; returns each step's loss.

    Compared with :func:`lora_lab.training.train` at a constant lr on a tiny GPT (every weight
    trained) and on a LoRA copy of it (only the adapters)."""
    return _run_check(_title("check_training_loop", fn, "fn"), _check_training_loop, fn)


def _check_training_loop(result: CheckResult, fn: Callable, generator: torch.Generator) -> None:
    data = _tokens(200, generator)
    fresh = _tiny_gpt()
    steps = total_steps(len(data), _BLOCK, _LOOP["batch_size"], _LOOP["epochs"])
    for label, start in (("a tiny GPT", fresh), ("a LoRA copy of it (only A and B trainable)", None)):
        if start is None:
            start = apply_lora_to_model(fresh, rank=2, alpha=4.0)
            torch.nn.init.normal_(next(p for n, p in start.named_parameters() if "lora_B" in n), std=0.02)
        expected_model = copy.deepcopy(start)
        expected = package_losses(expected_model, data, **_LOOP)
        model = copy.deepcopy(start)
        flags = [p.requires_grad for p in model.parameters()]
        error, losses = _attempt(fn, model, data, **_LOOP)
        if error is not None:
            result.fail(f"fn on {label} {error}", "build AdamW, then loop over iterate_batches(...) with the arguments")
            return
        if not _loss_list(result, label, losses, steps):
            return
        if [p.requires_grad for p in model.parameters()] != flags:
            result.fail(f"fn changed which parameters of {label} require gradients",
                        "leave requires_grad alone: the model says what is trained; pass those to AdamW")  # fmt: skip
            return
        frozen_moved = [n for (n, p), q, flag in zip(model.named_parameters(), start.parameters(), flags)
                        if not flag and not torch.equal(p, q)]  # fmt: skip
        if frozen_moved:
            result.fail(f"fn changed {len(frozen_moved)} frozen parameters of {label} (e.g. {frozen_moved[0]})",
                        "train only the parameters whose requires_grad is True")  # fmt: skip
            return
        if not _same_losses(losses, expected):
            result.fail(*_loop_mistake(start, data, losses, expected, label))
            return
        pairs = zip(model.parameters(), expected_model.parameters())
        if not all(torch.allclose(p, q, atol=1e-6) for p, q in pairs):
            result.fail(f"the losses of {label} match train's, but the weights after the last step do not",
                        "the last batch must be a full step too: zero_grad, backward, clip, step")  # fmt: skip
            return
        result.ok(f"{steps} losses and final weights of {label} equal lora_lab.training.train's")


def _loss_list(result: CheckResult, label: str, losses: object, steps: int) -> bool:
    if not isinstance(losses, list | tuple):
        result.fail(f"fn on {label} returned {type(losses).__name__}, not a list of losses",
                    "append each step's loss.item() to a list and return it")  # fmt: skip
        return False
    if any(isinstance(v, torch.Tensor) for v in losses):
        result.fail(f"fn on {label} returned tensors, not numbers",
                    "append loss.item(): a float, which also frees the step's graph")  # fmt: skip
        return False
    if len(losses) != steps or not all(_is_number(v) for v in losses):
        result.fail(f"fn on {label} returned {len(losses)} values, expected {steps} numbers (one per batch)",
                    "one step per batch of iterate_batches(data, block_size, batch_size, epochs, seed)")  # fmt: skip
        return False
    return True


def _same_losses(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= _LOSS_TOL for x, y in zip(a, b))


def _loop_mistake(start: nn.Module, data: torch.Tensor, losses: list[float], expected: list[float],
                  label: str) -> tuple[str, str]:  # fmt: skip
    mistakes = [
        ({"shift": False}, "the loss compares the logits with the inputs x, not the next tokens y",
         "position t predicts token t+1: the targets are y (x shifted by one)"),
        ({"zero_grad": False}, "the gradients accumulate from step to step: zero_grad is missing",
         "call optimizer.zero_grad() before loss.backward() in every step"),
        ({"step": False}, "the weights never change: optimizer.step() is missing",
         "after backward and clipping, call optimizer.step()"),
        ({"clip": False}, "the gradients are not clipped",
         "torch.nn.utils.clip_grad_norm_(params, 1.0) between backward() and step()"),
        ({"weight_decay": 0.01}, "AdamW decays the weights (its default weight_decay=0.01)",
         "pass weight_decay=0.0 to AdamW, as train does for LoRA"),
        ({"lr": 1e-3}, "the learning rate is AdamW's default 1e-3, not lr", "pass lr=lr to AdamW"),
    ]  # fmt: skip
    for flags, problem, hint in mistakes:
        replay = reference_loop(copy.deepcopy(start), data, **{**_LOOP, **flags})
        if _same_losses(losses, replay):
            return f"on {label}: {problem}", hint
    first = next(i for i, (x, y) in enumerate(zip(losses, expected)) if abs(x - y) > _LOSS_TOL)
    if first == 0:
        return (f"on {label} the first loss is {losses[0]:.4f}, train's {expected[0]:.4f}",
                "the first loss depends only on the batch and the loss: iterate_batches with the given seed, "
                "cross-entropy of logits against y")  # fmt: skip
    return (f"on {label} the losses agree up to step {first} and then differ "
            f"({losses[first]:.4f} vs {expected[first]:.4f})",
            "the update differs: AdamW over the trainable parameters; zero_grad, backward, clip, step")  # fmt: skip


def check_perplexity(fn: Callable[[nn.Module, torch.Tensor, int], float]) -> CheckResult:
    """Check ``fn(model, data, block_size)``: ``exp`` of the mean next-token NLL per token over
    the windows of :func:`lora_lab.training.evaluation_windows`, each target scored once, computed
    in eval mode without gradients; compared with :func:`lora_lab.training.perplexity`."""
    return _run_check(_title("check_perplexity", fn, "fn"), _check_perplexity, fn)


def _check_perplexity(result: CheckResult, fn: Callable, generator: torch.Generator) -> None:
    model = _tiny_gpt(dropout=0.3).train()  # dropout on: only eval mode gives the package's number
    data = _tokens(150, generator)
    seen: list[tuple[bool, bool]] = []
    hook = model.register_forward_pre_hook(lambda module, _: seen.append((module.training, torch.is_grad_enabled())))
    try:
        error, value = _attempt(fn, model, data, _BLOCK)
    finally:
        hook.remove()
    if error is not None:
        result.fail(f"fn(model, data, block_size) {error}", "loop over evaluation_windows(len(data), block_size)")
        return
    value = _scalar(value)
    if not _is_number(value):
        result.fail(f"fn returned {type(value).__name__}, not a number", "return math.exp(total / count), a float")
        return
    if not seen:
        result.fail("fn never called the model", "score the windows with model(inputs)")
        return
    if any(training for training, _ in seen):
        result.fail("the model ran in training mode (dropout on)", "call model.eval() before scoring")
        return
    result.ok("the model runs in eval mode")
    if any(grad for _, grad in seen):
        result.fail("the model ran with gradients enabled", "score under torch.no_grad(): no graph is needed")
        return
    result.ok("without gradients")
    expected = perplexity(model, data, _BLOCK)
    if math.isclose(value, expected, rel_tol=1e-6):
        result.ok(f"fn = lora_lab.training.perplexity = {expected:.4f} on a tiny GPT")
        return
    for wrong, problem, hint in _perplexity_mistakes(model, data):
        if wrong is not None and math.isclose(value, wrong, rel_tol=1e-6):
            result.fail(problem, hint)
            return
    result.fail(f"fn returned {value:.6g}, lora_lab.training.perplexity {expected:.6g}",
                "exp of the mean NLL per scored target; window (start, first) scores its targets "
                "from first on")  # fmt: skip


@torch.no_grad()
def _perplexity_mistakes(model: nn.Module, data: torch.Tensor) -> list[tuple[float | None, str, str]]:
    model.eval()
    size = min(_BLOCK, len(data) - 1)
    scored, window_means, every = [], [], []
    for start, first in evaluation_windows(len(data), _BLOCK):
        tokens = data[start : start + size + 1][None]
        nll = F.cross_entropy(model(tokens[:, :-1])[0][0], tokens[0, 1:], reduction="none").double()
        scored.append(nll[first:])
        window_means.append(nll[first:].mean().item())
        every.append(nll)
    scored_all, every_all = torch.cat(scored), torch.cat(every)
    total = scored_all.sum().item()
    return [
        (math.exp(total) if total < 700 else math.inf, "fn took exp of the summed NLL, not of the mean",
         "divide the summed NLL by the number of scored targets before exp"),
        (math.exp(sum(window_means) / len(window_means)), "fn averaged per window, not per target",
         "windows score different numbers of targets: sum the NLL and count the targets over all windows"),
        (math.exp(every_all.mean().item()), "fn scored every target of every window: the overlaps count twice",
         "score window (start, first) only from offset first on"),
        (scored_all.mean().item(), "fn returned the mean NLL (nats per token), not its exp",
         "perplexity = exp(mean NLL)"),
    ]  # fmt: skip
