"""Grader of notebook 08's exercise: merging a LoRA adapter into a transformers ``Conv1D`` weight.

GPT-2's ``Conv1D`` stores its weight as ``(in_features, out_features)`` and computes ``y = x W + b``, the
transpose of ``nn.Linear``'s layout, while the adapter keeps PEFT's ``A (r, in)`` and ``B (out, r)``. The merged
weight is therefore ``W + s·(B A)ᵀ`` (PEFT's ``fan_in_fan_out=True``). The typical slip is to add ``s·B A`` as
for an ``nn.Linear``: a shape error when ``in ≠ out``, and a silently wrong model when the layer is square
(GPT-2's ``attn.c_proj`` is).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .result import CheckResult, _attempt, _close, _run_check, _shape_or_type, _title

# (in_features, out_features, rank, scaling): a wide layer (c_attn-like, in < out), then a square one (c_proj).
_CASES = ((6, 10, 2, 2.0), (8, 8, 3, 0.5))


def check_conv1d_merge(
    fn: Callable[..., torch.Tensor], cases: Sequence[tuple[int, int, int, float]] = _CASES
) -> CheckResult:
    """Check ``fn(weight, lora_A, lora_B, scaling)``: the merged weight of a ``Conv1D`` layer (``weight`` of shape
    ``(in, out)``), i.e. ``weight + scaling·(lora_B @ lora_A)ᵀ``, as a new tensor that leaves ``weight``
    unchanged. Adding ``B A`` untransposed, forgetting the scaling, returning only the update and writing into
    ``weight`` are named. ``cases``: ``(in, out, rank, scaling)`` per layer tried, in order."""
    return _run_check(_title("check_conv1d_merge", fn, "fn"), _check_merges, fn, cases)


def _check_merges(result: CheckResult, fn: Callable[..., torch.Tensor], cases, generator: torch.Generator) -> None:
    for d_in, d_out, rank, scaling in cases:
        weight = torch.randn(d_in, d_out, generator=generator)
        lora_A = torch.randn(rank, d_in, generator=generator)
        lora_B = torch.randn(d_out, rank, generator=generator)
        original = weight.clone()
        delta = lora_B @ lora_A  # (out, in), as an nn.Linear weight
        label = f"a Conv1D with in={d_in}, out={d_out} (weight {tuple(weight.shape)}), r={rank}, scaling={scaling:g}"
        error, got = _attempt(fn, weight, lora_A, lora_B, scaling)
        if error is not None:
            result.fail(
                f"{label}: fn {error}",
                "W is stored (in, out) but B @ A is (out, in): return weight + scaling * (lora_B @ lora_A).T",
            )
            return
        if not torch.equal(weight, original):
            result.fail(
                f"{label}: fn changed `weight` in place",
                "return a new tensor (weight + ...): a weight may be shared, e.g. GPT-2's lm_head with the token "
                "embedding, and writing into it changes the other module too",
            )
            return
        expected = original + scaling * delta.T
        if isinstance(got, torch.Tensor) and _close(got, expected):
            result.ok(f"{label}: W + s·(B A)ᵀ, and `weight` is unchanged")
            continue
        mistakes = {
            "added B A without transposing it: that is nn.Linear's (out, in) layout; Conv1D stores W as (in, out), "
            "so the update must be transposed too — on a square layer the shapes fit and the model is silently "
            "wrong": original + scaling * delta if d_in == d_out else None,
            "forgot the scaling s = α/r": original + delta.T,
            "returned only the update s·(B A)ᵀ; add it to W": scaling * delta.T,
        }
        named = next((text for text, wrong in mistakes.items() if isinstance(got, torch.Tensor) and wrong is not None
                      and _close(got, wrong)), None)  # fmt: skip
        result.fail(
            f"{label}: fn returned "
            + (f"the wrong matrix: {named}" if named else f"{_shape_or_type(got)}, not W + s·(B A)ᵀ of shape "
               f"{tuple(expected.shape)}"),  # fmt: skip
            "return weight + scaling * (lora_B @ lora_A).T",
        )
        return
