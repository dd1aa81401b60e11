"""Grader of the student's adapter, ``LoRALayer``: the two factors and the update ``(α/r)·x Aᵀ Bᵀ``.

Conventions checked (the paper's, Hu et al. 2021, and PEFT's, in PyTorch's row layout):
``nn.Linear`` stores ``W`` as ``(out_features, in_features)`` and computes ``y = x Wᵀ + b``;
``lora_A`` is ``(rank, in_features)``, ``lora_B`` is ``(out_features, rank)``, ``ΔW = B A`` and
the adapter's output is ``(α / r) · x Aᵀ Bᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factors import (
    _ALPHA,
    _IN,
    _OUT,
    _RANK,
    _TOKENS,
    _adapter_output,
    _backward,
    _check_3d_input,
    _check_factor_shapes,
    _check_init,
    _diagnose_adapter,
    _factor_parameters,
    _randomise,
)
from .result import _SEED, CheckResult, _attempt, _describe_error, _name, _run_check, _shape_or_type, _title

_FORWARD_HINT = "take x down to rank dimensions through A, back up through B (transposed as nn.Linear does), then scale"


def check_lora_layer(
    cls: Callable[..., nn.Module],
    in_features: int = _IN,
    out_features: int = _OUT,
    rank: int = _RANK,
    alpha: float = _ALPHA,
) -> CheckResult:
    """Check a LoRA adapter class built as ``cls(in_features, out_features, rank, alpha)``.

    Properties: ``lora_A``/``lora_B`` are parameters of shapes ``(rank, in)``/``(out, rank)``
    (a transposed A is named as such); B is zero and A non-zero at init; ``forward(x)`` equals
    ``(α/r)·x Aᵀ Bᵀ`` for random A and B (a missing or inverted scaling, and ``x·ΔW`` for
    ``x·ΔWᵀ``, are named); 2-D and 3-D inputs give ``(..., out_features)``; gradients reach A and
    B; and the forward is factorised (it does not build the ``out × in`` matrix ``ΔW``).
    """
    title = _title("check_lora_layer", cls, repr(cls))
    return _run_check(title, _check_lora_layer, cls, in_features, out_features, rank, alpha)


def _check_lora_layer(
    result: CheckResult,
    cls: Callable[..., nn.Module],
    d_in: int,
    d_out: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
) -> None:
    error, layer = _attempt(cls, d_in, d_out, rank, alpha)
    if error is not None:
        result.fail(
            f"{_name(cls, 'cls')}({d_in}, {d_out}, {rank}, {alpha:g}) {error}",
            "the constructor takes (in_features, out_features, rank, alpha), in that order, "
            "like the course's LoRALayer",
        )
        return
    if not isinstance(layer, nn.Module):
        result.fail(
            f"the instance is a {type(layer).__name__}, not an nn.Module",
            "subclass nn.Module and call super().__init__() first",
        )
        return
    factors = _factor_parameters(result, layer)
    if factors is None:
        return
    A, B = factors
    if not _check_factor_shapes(result, A, B, d_in, d_out, rank):
        result.fail(
            "forward not checked: fix the shapes of lora_A and lora_B first",
            "the forward's expected value (α/r)·x Aᵀ Bᵀ needs A (rank, in) and B (out, rank)",
        )
        return
    _check_init(result, A, B)

    _randomise([A, B], generator)
    x = torch.randn(_TOKENS, d_in, generator=generator)
    if not _check_layer_output(result, layer, cls, x, A, B, d_in, d_out, rank, alpha):
        return

    _check_3d_input(
        result,
        layer,
        lambda x3: _adapter_output(x3, A.detach(), B.detach(), alpha / rank),
        d_in,
        generator,
        label="a 3-D input (batch, seq, in) = {input}",
        mismatch="a 3-D input {input} gives {output} with other values than row by row",
        mismatch_hint="use @ (torch.matmul), which broadcasts over leading dimensions, and transpose only "
        "the 2-D factors (.T on A and B, not on x)",
        error_hint="use @ (torch.matmul), which broadcasts over leading dimensions, not torch.mm",
    )

    error = _backward(layer, x, (A, B))
    if error is None:
        missing = [n for n, p in (("lora_A", A), ("lora_B", B)) if p.grad is None or torch.count_nonzero(p.grad) == 0]
    else:
        missing = [f"any factor (backward {error})"]
    if missing:
        result.fail(
            f"no gradient reaches {' and '.join(missing)} (random A and B, loss = output.sum())",
            "use the parameters themselves in forward: not .data, .detach(), a copy, or torch.no_grad()",
        )
    else:
        result.ok("gradients reach lora_A and lora_B")

    _check_factorised(result, layer, x, d_in, d_out, rank)


def _check_layer_output(
    result: CheckResult,
    layer: nn.Module,
    cls: Callable[..., nn.Module],
    x: torch.Tensor,
    A: nn.Parameter,
    B: nn.Parameter,
    d_in: int,
    d_out: int,
    rank: int,
    alpha: float,
) -> bool:
    """Compare ``layer(x)`` with ``(α/r)·x Aᵀ Bᵀ``, and a square layer's output too; False when
    the output is too wrong for the later checks to mean anything."""
    # First: when the forward raises, the square layer, where x·ΔW type-checks, may name the mistake.
    square = _square_layer_diagnosis(cls, d_in + d_out, rank, alpha)
    try:
        y = layer(x)
    except Exception as error:
        problem = f"forward on a ({_TOKENS}, {d_in}) input {_describe_error(error)}"
        if square is not None and "x·ΔW instead" in square[0]:
            # The shape error is the symptom; the square layer, where the mistake type-checks, names it.
            mistake = square[0].removeprefix("the adapter ")
            result.fail(f"{problem}; on a square layer, where it type-checks, it {mistake}", square[1])
        else:
            result.fail(problem, _FORWARD_HINT)
        return False
    if not isinstance(y, torch.Tensor) or y.shape != (_TOKENS, d_out):
        result.fail(
            f"forward on a ({_TOKENS}, {d_in}) input returned {_shape_or_type(y)}, expected ({_TOKENS}, {d_out})",
            "the adapter maps in_features to out_features: (x Aᵀ) Bᵀ",
        )
        return False
    with torch.no_grad():
        diagnosis = _diagnose_adapter(y.detach(), x, A.detach(), B.detach(), rank, alpha, torch.zeros_like(y))
    if diagnosis is not None:
        result.fail(*diagnosis)
        return False
    result.ok(f"forward(x) = (α/r)·x Aᵀ Bᵀ for random A and B, shape ({_TOKENS}, {d_out})")
    if square is None:
        result.ok("forward is right for a square layer too (x·ΔWᵀ, not x·ΔW)")
    else:
        result.fail(*square)
    return True


def _square_layer_diagnosis(cls: Callable[..., nn.Module], dim: int, rank: int, alpha: float) -> tuple[str, str] | None:
    """Run the adapter on a square layer, where ``x·ΔW`` type-checks as well as ``x·ΔWᵀ`` and only
    the values tell them apart. None when right."""
    generator = torch.Generator().manual_seed(_SEED + 1)
    try:
        layer = cls(dim, dim, rank, alpha)
        A, B = layer.lora_A, layer.lora_B
        _randomise([A, B], generator)
        x = torch.randn(_TOKENS, dim, generator=generator)
        with torch.no_grad():
            y = layer(x)
            return _diagnose_adapter(y, x, A.detach(), B.detach(), rank, alpha, torch.zeros_like(y))
    except Exception as error:
        return (f"a square layer ({dim} → {dim}) {_describe_error(error)}", _FORWARD_HINT)


def _check_factorised(result: CheckResult, layer: nn.Module, x: torch.Tensor, d_in: int, d_out: int, rank: int) -> None:
    flops = _forward_flops(layer, x)
    factorised = 2 * _TOKENS * rank * (d_in + d_out)  # (x Aᵀ): 2·N·r·in, then (·) Bᵀ: 2·N·r·out
    if flops is not None and flops <= factorised:
        result.ok(f"forward is factorised: {flops} FLOPs for {_TOKENS} tokens = 2·N·r·(in + out), ΔW never built")
    elif flops is not None:
        result.fail(
            f"forward costs {flops} FLOPs for {_TOKENS} tokens, more than the factorised 2·N·r·(in + out) = "
            f"{factorised}: it builds ΔW = B·A ({d_out}×{d_in}), and under autograd every backward then computes a "
            "full out×in weight gradient — the cost LoRA exists to avoid",
            "multiply x by one factor at a time (two thin products); never form B @ A",
        )


def _forward_flops(module: nn.Module, x: torch.Tensor) -> int | None:
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    except Exception:  # reported by the output check already
        return None
    return counter.get_total_flops()
