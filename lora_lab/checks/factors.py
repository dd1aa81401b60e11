"""Checks of the two LoRA factors that the layer and the linear graders share.

Both graders look for ``lora_A`` and ``lora_B`` as parameters of the right shapes, compare the
output with ``(α/r)·x Aᵀ Bᵀ`` (naming the likeliest mistake when it differs), feed a 3-D input
and backpropagate; the wording of what they print differs, the logic here is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .result import CheckResult, _attempt, _close, _describe_error, _shape_or_type

# Default shapes for the layer checks: in, out and rank all different, so a transposed factor
# has a shape of its own, and α/r = 2 differs from 1, r/α and α, so a wrong scaling shows.
_IN, _OUT, _RANK, _ALPHA = 12, 10, 3, 6.0
_TOKENS = 5  # rows of the 2-D test input: fewer than in/out, so materialising ΔW costs visibly more


def _adapter_output(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (x @ A.t()) @ B.t()


def _diagnose_adapter(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: int, alpha: float, base: torch.Tensor
) -> tuple[str, str] | None:
    """None when ``y == base + (α/r)·x Aᵀ Bᵀ``, else the likeliest mistake and a hint."""
    scaling = alpha / rank
    unscaled = _adapter_output(x, A, B, 1.0)
    if _close(y, base + scaling * unscaled):
        return None
    candidates = [
        (
            base + unscaled,
            "the adapter's output is not scaled: it equals x Aᵀ Bᵀ, without α/r",
            "multiply the adapter's output by self.scaling = alpha / rank",
        ),
        (
            base + unscaled * rank / alpha,
            "the adapter's output is scaled by r/α instead of α/r",
            "scaling = alpha / rank (α on top)",
        ),
        (
            base + unscaled * alpha,
            "the adapter's output is scaled by α instead of α/r",
            "scaling = alpha / rank: dividing by r keeps the update's size the same when r changes",
        ),
    ]
    if A.shape[1] == B.shape[0]:  # square layer: x ΔW type-checks as well as x ΔWᵀ
        wrong = x @ (B @ A) * scaling
        candidates.append(
            (
                base + wrong,
                "the adapter computes x·ΔW instead of x·ΔWᵀ (it multiplies by B A untransposed)",
                "nn.Linear computes x Wᵀ, so the adapter is x (B A)ᵀ = (x Aᵀ) Bᵀ; the mistake only type-checks "
                "when in_features == out_features",
            )
        )
    for expected, problem, hint in candidates:
        if _close(y, expected):
            return problem, hint
    difference = (y - base - scaling * unscaled).abs().max().item() if y.shape == base.shape else float("nan")
    return (
        f"the output differs from (α/r)·x Aᵀ Bᵀ by up to {difference:.3g} for random A and B",
        "the adapter is (α/r)·x Aᵀ Bᵀ: through A down to rank dimensions, through B back up, then scaled",
    )


def _randomise(params: list[nn.Parameter], generator: torch.Generator) -> None:
    """Overwrite ``params`` in place with draws from the check's private ``generator``: at init
    B = 0 makes the adapter's output zero, which would hide every mistake in the forward."""
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _factor_parameters(result: CheckResult, layer: nn.Module, where: str = "") -> tuple[nn.Parameter, ...] | None:
    """``(lora_A, lora_B)`` if both exist and are registered parameters; reports otherwise."""
    factors = []
    for name in ("lora_A", "lora_B"):
        value = getattr(layer, name, None)
        if value is None:
            result.fail(
                f"{where}has no attribute {name}",
                "name the two factors self.lora_A and self.lora_B (the course's, loralib's and PEFT's names)",
            )
            return None
        if not isinstance(value, nn.Parameter):
            result.fail(
                f"{where}{name} is a {type(value).__name__}, not an nn.Parameter: model.parameters() and the "
                "optimizer never see it, so it would never be trained",
                f"wrap it: self.{name} = nn.Parameter(...)",
            )
            return None
        factors.append(value)
    result.ok(f"{where}lora_A and lora_B are nn.Parameters")
    return tuple(factors)


def _check_factor_shapes(
    result: CheckResult, A: torch.Tensor, B: torch.Tensor, d_in: int, d_out: int, rank: int
) -> bool:
    """Report the shape of each factor (a transposed one is named as such); True when both are right."""
    A_ok = _check_factor_shape(
        result,
        "lora_A",
        A,
        "(rank, in_features)",
        (rank, d_in),
        transposed=(
            f"lora_A has shape {(d_in, rank)} = (in_features, rank): it is transposed (the course's layout)",
            f"A is r × k in the paper, so lora_A must be (rank, in_features) = {(rank, d_in)}; then "
            "ΔW = B A has nn.Linear.weight's shape (out, in), as in PEFT",
        ),
        hint="lora_A maps the input (in_features) down to rank dimensions",
    )
    B_ok = _check_factor_shape(
        result,
        "lora_B",
        B,
        "(out_features, rank)",
        (d_out, rank),
        transposed=(
            f"lora_B has shape {(rank, d_out)} = (rank, out_features): it is transposed",
            f"B is d × r in the paper, so lora_B must be (out_features, rank) = {(d_out, rank)}",
        ),
        hint="lora_B maps rank dimensions up to the output (out_features)",
    )
    return A_ok and B_ok


def _check_factor_shape(
    result: CheckResult,
    name: str,
    factor: torch.Tensor,
    layout: str,
    expected: tuple[int, int],
    *,
    transposed: tuple[str, str],
    hint: str,
) -> bool:
    """Report whether ``factor`` has the ``expected`` shape; ``transposed`` is the problem and hint
    for the transposed shape, which the course's layout and a misread paper both lead to."""
    shape = tuple(factor.shape)
    if shape == expected:
        result.ok(f"{name} has shape {layout} = {expected}")
        return True
    if shape == expected[::-1]:
        result.fail(*transposed)
    else:
        result.fail(f"{name} has shape {shape}, expected {layout} = {expected}", hint)
    return False


def _check_init(result: CheckResult, A: torch.Tensor, B: torch.Tensor) -> None:
    if torch.count_nonzero(B) == 0:
        result.ok("lora_B is zero at init, so ΔW = B A = 0 and the wrapped model starts unchanged")
    else:
        result.fail(
            "lora_B is not zero at init: ΔW = B A ≠ 0, so wrapping a pretrained layer would change its outputs "
            "before any training",
            "initialise B with zeros (torch.zeros or nn.init.zeros_) and A randomly",
        )
    if torch.count_nonzero(A) > 0:
        result.ok("lora_A is random (non-zero) at init")
    else:
        result.fail(
            "lora_A is zero at init too: with A = B = 0 both gradients dL/dA and dL/dB are zero, so the adapter "
            "can never start learning",
            "draw A randomly (e.g. torch.randn(rank, in_features) * 0.01, or nn.init.kaiming_uniform_)",
        )


def _check_3d_input(
    result: CheckResult,
    module: nn.Module,
    expected: Callable[[torch.Tensor], torch.Tensor],
    d_in: int,
    generator: torch.Generator,
    *,
    label: str,
    mismatch: str,
    mismatch_hint: str,
    error_hint: str,
) -> None:
    """Run ``module`` on a random (batch, seq, in) input and compare with ``expected(x3)``: LoRA
    layers sit inside transformers, which feed them 3-D activations.

    The two graders word the report differently: ``label`` names the input (``{input}`` is its
    shape) in the ok line and in an error; ``mismatch`` is the problem when the values differ,
    with ``{input}`` and ``{output}``, what came back.
    """
    x3 = torch.randn(2, _TOKENS, d_in, generator=generator)
    shape = tuple(x3.shape)
    try:
        with torch.no_grad():
            y3 = module(x3)
        if _close(y3, expected(x3)):  # also raises for a y3 that is no tensor: reported below
            result.ok(f"{label.format(input=shape)} gives {tuple(y3.shape)}")
        else:
            result.fail(mismatch.format(input=shape, output=_shape_or_type(y3)), mismatch_hint)
    except Exception as error:
        result.fail(f"{label.format(input=shape)} {_describe_error(error)}", error_hint)


def _backward(module: nn.Module, x: torch.Tensor, params: Iterable[nn.Parameter]) -> str | None:
    """Clear the gradients of ``params`` and backpropagate ``module(x).sum()``; None, or what
    the backward (or the forward) raised."""
    for param in params:
        param.grad = None
    return _attempt(lambda: module(x).sum().backward())[0]
