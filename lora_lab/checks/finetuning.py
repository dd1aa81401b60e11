"""Graders of notebook 04's exercises: the optimiser that trains only A and B, and the merged weight.

Both build their own small adapted models, so a grade never depends on the notebook's training
having run (or succeeded): ``check_lora_optimizer`` on ``apply_lora_to_model`` of a tiny MLP,
``check_merged_weight`` on a ``LoRALinear`` whose B is random (at init B = 0 and every merge is W).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..lora import LoRALinear, apply_lora_to_model
from .factors import _randomise
from .result import CheckResult, _attempt, _close, _run_check, _shape_or_type, _title

_LR = 0.05


def check_lora_optimizer(fn: Callable[[nn.Module, float], torch.optim.Optimizer]) -> CheckResult:
    """Check ``fn(model, lr)``: a ``torch.optim.AdamW`` with learning rate ``lr`` over exactly the
    parameters of ``model`` that require gradients, each once, leaving ``requires_grad`` as it was.

    Tried on an adapted MLP, then on one where a non-adapter parameter was unfrozen by hand (so a
    selection by name, ``"lora" in name``, is told apart from one by ``requires_grad``)."""
    return _run_check(_title("check_lora_optimizer", fn, "fn"), _check_lora_optimizer, fn)


def _adapted_mlp() -> nn.Module:
    return apply_lora_to_model(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)), rank=2, alpha=4.0)


def _check_lora_optimizer(result: CheckResult, fn: Callable, _generator: torch.Generator) -> None:
    unfrozen = _adapted_mlp()
    unfrozen[1].weight.requires_grad = True  # trainable, but no adapter's
    for label, model in (("an adapted MLP", _adapted_mlp()), ("an MLP with its LayerNorm unfrozen too", unfrozen)):
        flags = [p.requires_grad for p in model.parameters()]
        error, optimizer = _attempt(fn, model, _LR)
        if error is not None:
            result.fail(f"fn(model, lr) on {label} {error}", "build the optimiser from the model's parameters")
            return
        if [p.requires_grad for p in model.parameters()] != flags:
            result.fail(
                f"fn changed which parameters of {label} require gradients",
                "only choose parameters: freezing is apply_lora_to_model's job, done before",
            )
            return
        if not _one_optimizer(result, label, model, optimizer):
            return
    result.ok("AdamW over exactly the parameters that require gradients, each once, with lr passed on")
    result.ok("chosen by requires_grad, not by name: an unfrozen non-adapter parameter is trained too")


def _one_optimizer(result: CheckResult, label: str, model: nn.Module, optimizer: object) -> bool:
    if not isinstance(optimizer, torch.optim.AdamW):
        result.fail(
            f"fn returned {type(optimizer).__name__} for {label}, not a torch.optim.AdamW",
            "the course trains with AdamW (torch.optim.AdamW)",
        )
        return False
    held = [p for group in optimizer.param_groups for p in group["params"]]
    wanted = [p for p in model.parameters() if p.requires_grad]
    ids, wanted_ids = [id(p) for p in held], {id(p) for p in wanted}
    frozen = sum(1 for p in held if not p.requires_grad)
    if frozen:
        result.fail(
            f"the optimiser of {label} holds {frozen} frozen parameters (requires_grad False)",
            "keep only the parameters whose requires_grad is True: the course filters them",
        )
        return False
    if len(ids) != len(set(ids)):
        result.fail(f"the optimiser of {label} holds a parameter twice", "pass each parameter once")
        return False
    if set(ids) != wanted_ids:
        result.fail(
            f"the optimiser of {label} holds {len(set(ids) & wanted_ids)} of the {len(wanted_ids)} parameters "
            "that require gradients",
            "choose parameters by their requires_grad flag, not by their name or module type",
        )
        return False
    if any(group["lr"] != _LR for group in optimizer.param_groups):
        result.fail(f"fn(model, lr={_LR}) built an optimiser with another learning rate", "pass lr on to AdamW")
        return False
    return True


def check_merged_weight(fn: Callable[[nn.Module], torch.Tensor]) -> CheckResult:
    """Check ``fn(layer)`` for a ``LoRALinear``: ``W0 + (α/r)·B A`` as a new ``(out, in)`` tensor,
    the layer left unchanged. Tried with random B (at init B = 0 hides every mistake); a transposed
    result, a missing or inverted scaling, ``ΔW`` without ``W0`` and ``A B`` are named."""
    return _run_check(_title("check_merged_weight", fn, "fn"), _check_merged_weight, fn)


def _check_merged_weight(result: CheckResult, fn: Callable, generator: torch.Generator) -> None:
    rank, alpha = 2, 6.0
    layer = LoRALinear(nn.Linear(5, 3), rank=rank, alpha=alpha)
    _randomise([layer.lora.lora_B], generator)
    before = [t.detach().clone() for t in (layer.weight, layer.lora.lora_A, layer.lora.lora_B)]
    W, A, B = before
    error, merged = _attempt(fn, layer)
    if error is not None:
        result.fail(f"fn(layer) {error}", "read W from layer.weight and A, B, α, r from layer.lora")
        return
    after = (layer.weight, layer.lora.lora_A, layer.lora.lora_B)
    if not all(torch.equal(a.detach(), b) for a, b in zip(after, before)):
        result.fail("fn changed the layer's weight or factors", "build a new tensor; leave the layer as it was")
        return
    result.ok("the layer is left unchanged")
    if not isinstance(merged, torch.Tensor) or merged.shape != W.shape:
        transposed = isinstance(merged, torch.Tensor) and merged.shape == W.shape[::-1]
        result.fail(
            f"fn(layer) returned {_shape_or_type(merged)}, expected W's shape {tuple(W.shape)} = (out, in)"
            + (": it is transposed" if transposed else ""),
            "ΔW = B A is (out × r)(r × in): the order of the product decides the shape",
        )
        return
    merged = merged.detach()
    delta = B @ A
    mistakes = [
        (W + delta, "the update is not scaled: W + B A, without α/r", "ΔW is scaled by α/r (layer.lora.scaling)"),
        (W + delta * rank / alpha, "the update is scaled by r/α instead of α/r", "α on top: alpha / rank"),
        (alpha / rank * delta, "the result is (α/r)·B A alone: W0 is missing", "merging adds the update to W0"),
    ]
    if _close(merged, W + alpha / rank * delta):
        result.ok(f"fn(layer) = W0 + (α/r)·B A, shape {tuple(W.shape)}, for random B")
        return
    for expected, problem, hint in mistakes:
        if _close(merged, expected):
            result.fail(problem, hint)
            return
    result.fail(
        f"fn(layer) differs from W0 + (α/r)·B A by up to {(merged - W - alpha / rank * delta).abs().max():.3g}",
        "W0 is layer.weight; B A is lora_B times lora_A; the factor is α/r",
    )
