"""Grader of notebook 02's merge/unmerge exercise: fold ΔW into the weight in place, and take it out exactly.

``merge(layer)`` writes ``W + (α/r)·B A`` into ``layer.original_layer.weight``, sets ``layer.merged``
(so that :class:`lora_lab.LoRALinear`'s forward runs the base layer alone) and returns a copy of the
original ``W``; ``unmerge(layer, saved)`` puts that copy back and clears ``layer.merged``. The point
of returning ``W``: in floating point ``(W + ΔW) − ΔW`` is not ``W`` bit for bit, so an unmerge that
subtracts drifts a little with every round trip. The layers graded are ``lora_lab.LoRALinear``s built
here with a random ``B`` (at init ``B = 0`` and every merge is ``W``), so a mistake in the student's
own layer (another exercise) does not count here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..lora import LoRALinear
from .factors import _randomise
from .result import CheckResult, _attempt, _close, _run_check, _shape_or_type


def check_merge_unmerge(
    merge: Callable[[nn.Module], torch.Tensor], unmerge: Callable[[nn.Module, torch.Tensor], None]
) -> CheckResult:
    """Check ``merge(layer)`` and ``unmerge(layer, saved)`` on ``lora_lab.LoRALinear`` layers with random B.

    Properties: merge returns a copy of the original ``W`` (not the weight itself); after merge the
    weight is ``W + (α/r)·B A`` (a missing or inverted scaling is named), the layer is marked merged
    and gives the same outputs (an adapter counted twice is named), A, B and the frozen flag are as
    they were; after unmerge the weight is ``W`` bit for bit (an unmerge by subtraction is named),
    the layer is no longer marked merged and gives exactly its first outputs.
    """
    title = f"check_merge_unmerge({getattr(merge, '__name__', 'merge')}, {getattr(unmerge, '__name__', 'unmerge')})"
    return _run_check(title, _check_merge_unmerge, merge, unmerge)


def _layer(d_in: int, d_out: int, rank: int, alpha: float, generator: torch.Generator) -> LoRALinear:
    linear = nn.Linear(d_in, d_out)
    _randomise([linear.weight, linear.bias], generator)
    layer = LoRALinear(linear, rank=rank, alpha=alpha)
    _randomise([layer.lora.lora_A, layer.lora.lora_B], generator)
    return layer


def _check_merge_unmerge(result: CheckResult, merge: Callable, unmerge: Callable, generator: torch.Generator) -> None:
    for d_in, d_out, rank, alpha in ((7, 5, 2, 6.0), (9, 9, 3, 1.5)):
        layer = _layer(d_in, d_out, rank, alpha, generator)
        x = torch.randn(4, d_in, generator=generator)
        label = f"a {d_out}×{d_in} layer, r = {rank}, α = {alpha:g}"
        if not _round_trip(result, merge, unmerge, layer, x, label):
            return
    result.ok("merge: weight = W + (α/r)·B A, layer.merged set, same outputs, A and B untouched, W still frozen")
    result.ok("unmerge: W restored bit for bit from merge's copy, layer.merged cleared, the first outputs exactly")


def _round_trip(
    result: CheckResult, merge: Callable, unmerge: Callable, layer: LoRALinear, x: torch.Tensor, label: str
) -> bool:
    W, A, B = (t.detach().clone() for t in (layer.weight, layer.lora.lora_A, layer.lora.lora_B))
    scaling = layer.lora.scaling
    with torch.no_grad():
        y = layer(x)
    error, saved = _attempt(merge, layer)
    if error is not None:
        result.fail(f"merge on {label} {error}", "ΔW = (α/r)·B A is (out × r)(r × in), the weight's shape (out, in)")
        return False
    if not (isinstance(saved, torch.Tensor) and torch.equal(saved.detach(), W)):
        if (
            isinstance(saved, torch.Tensor)
            and saved is layer.weight
            or (
                isinstance(saved, torch.Tensor) and saved.shape == W.shape and torch.equal(saved.detach(), layer.weight)
            )
        ):
            result.fail(
                "merge returned the weight itself, which the merge then changed: W is lost",
                "return a copy made before the update: saved = layer.original_layer.weight.clone()",
            )
        else:
            result.fail(
                f"merge returned {_shape_or_type(saved)}, not a copy of the original W",
                "return W (a clone, made before the update): unmerge needs it to restore W exactly",
            )
        return False
    if not _merged_weight(result, layer, W, A, B, scaling):
        return False
    if not (torch.equal(layer.lora.lora_A, A) and torch.equal(layer.lora.lora_B, B)):
        result.fail("merge changed lora_A or lora_B", "leave the adapter as it is: unmerge must give it back")
        return False
    if layer.weight.requires_grad:
        result.fail(
            "after merge the base weight requires grad: the frozen W became trainable",
            "update the weight in place under torch.no_grad() (or keep requires_grad=False)",
        )
        return False
    with torch.no_grad():
        y_merged = layer(x)
    if not getattr(layer, "merged", False):
        twice = _close(y_merged, y + layer.lora(x).detach(), tol=1e-4)
        result.fail(
            "merge left layer.merged False" + (": the adapter is counted twice (in W and in forward)" if twice else ""),
            "set layer.merged = True: forward then runs the base layer alone, which now holds ΔW",
        )
        return False
    if not _close(y_merged, y, tol=1e-4):
        result.fail(f"after merge the outputs of {label} differ from before", "the merged layer must compute the same")
        return False
    error, _ = _attempt(unmerge, layer, saved)
    if error is not None:
        result.fail(f"unmerge on {label} {error}", "put the saved W back into layer.original_layer.weight")
        return False
    weight = layer.weight.detach()
    if not torch.equal(weight, W):
        if _close(weight, W, tol=1e-4):
            result.fail(
                f"after unmerge W is off by up to {(weight - W).abs().max().item():.2g}: subtracting ΔW again does "
                "not give W bit for bit in floating point",
                "put back the copy merge returned (weight.copy_(saved)) instead of subtracting",
            )
        else:
            result.fail("after unmerge the weight is not the original W", "copy the saved W back into the weight")
        return False
    if getattr(layer, "merged", True) or layer.weight.requires_grad:
        result.fail(
            "after unmerge layer.merged is still True (or W requires grad): the adapter is skipped",
            "set layer.merged = False, so forward adds the adapter again",
        )
        return False
    with torch.no_grad():
        if not torch.equal(layer(x), y):
            result.fail("after unmerge the outputs are not exactly the first ones", "restore W and the merged flag")
            return False
    return True


def _merged_weight(
    result: CheckResult, layer: LoRALinear, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> bool:
    weight = layer.weight.detach()
    delta = B @ A
    if weight.shape != W.shape:
        result.fail(
            f"after merge the weight has shape {tuple(weight.shape)}, not W's {tuple(W.shape)}",
            "ΔW = B A is (out × in), like W",
        )
        return False
    if _close(weight, W + scaling * delta):
        return True
    mistakes = [
        (W, "merge did not change the weight", "add (α/r)·B A to layer.original_layer.weight in place"),
        (W + delta, "the merged weight is W + B A, without α/r", "scale ΔW by layer.lora.scaling"),
        (W + delta / scaling, "the merged weight is scaled by r/α instead of α/r", "use layer.lora.scaling = α/r"),
        (scaling * delta, "the merged weight is (α/r)·B A alone: W is missing", "add ΔW to W, do not replace W"),
    ]
    for expected, problem, hint in mistakes:
        if _close(weight, expected):
            result.fail(problem, hint)
            return False
    result.fail(
        f"the merged weight differs from W + (α/r)·B A by up to {(weight - W - scaling * delta).abs().max():.3g}",
        "W + layer.lora.scaling * (lora_B @ lora_A)",
    )
    return False
