"""Graders of notebook 07's exercises: DoRA's forward and NF4 quantisation.

``check_dora_forward(fn)`` holds ``fn(x, weight, bias, lora_A, lora_B, magnitude, scaling)`` to
:class:`lora_lab.lora.dora.DoRALinear` (PEFT's norm axis, the norm detached in backward) and names
the usual slips: the norm over the wrong axis, the norm of ``W`` instead of ``W + s·B A``, the bias
inside the rescaling, a missing scaling, a norm that is not detached.

``check_nf4_quantize(fn)`` holds ``fn(weight, block_size) -> (indices, absmax)`` to
:func:`lora_lab.lora.nf4.quantize_nf4` and names its slips: one absmax for the whole tensor,
rounding to the nearest level of the *unnormalised* value, the absmax taken without ``abs``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..lora.dora import DoRALinear
from ..lora.nf4 import dequantize_nf4, nf4_code_book, quantize_nf4
from .result import CheckResult, _as_tensor, _attempt, _close, _run_check, _shape_or_type, _title

__all__ = ["check_dora_forward", "check_nf4_quantize"]

# in ≠ out, so the wrong norm axis has a shape of its own; s = 2 so a missing scaling shows.
_IN, _OUT, _RANK, _ALPHA, _TOKENS = 7, 5, 2, 4.0, 3


def _dora_case(generator: torch.Generator) -> tuple[DoRALinear, dict[str, torch.Tensor]]:
    layer = DoRALinear(nn.Linear(_IN, _OUT).double(), rank=_RANK, alpha=_ALPHA)
    with torch.no_grad():
        for param in (layer.lora.lora_A, layer.lora.lora_B):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
        layer.lora_magnitude_vector.mul_(0.5 + torch.rand(_OUT, generator=generator, dtype=torch.float64))
    x = torch.randn(_TOKENS, _IN, generator=generator, dtype=torch.float64)
    tensors = {
        "x": x,
        "weight": layer.original_layer.weight.detach(),
        "bias": layer.original_layer.bias.detach(),
        "lora_A": layer.lora.lora_A,
        "lora_B": layer.lora.lora_B,
        "magnitude": layer.lora_magnitude_vector,
    }
    return layer, tensors  # fmt: skip


def _dora_mistakes(t: dict[str, torch.Tensor], s: float) -> list[tuple[torch.Tensor, str, str]]:
    x, W, b, A, B, m = (t[k].detach() for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude"))
    V = W + s * B @ A

    def rescaled(direction: torch.Tensor, norm: torch.Tensor, bias_inside: bool = False) -> torch.Tensor:
        out = x @ direction.t()
        return (out + b) * (m / norm) if bias_inside else out * (m / norm) + b

    return [
        (rescaled(V, W.norm(dim=1)), "the norm is ‖W‖, not ‖W + s·B A‖: DoRA normalises the adapted weight",
         "norm = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1)"),
        (rescaled(V, V.norm(dim=1), bias_inside=True), "the bias is inside the rescaling: (m/‖V‖)·(x Vᵀ + b)",
         "rescale x Vᵀ only, then add the bias: the bias is not part of W"),
        (rescaled(W + B @ A, (W + B @ A).norm(dim=1)), "the scaling s = α/r is missing from V = W + s·B A",
         "V = weight + scaling * lora_B @ lora_A"),
        (x @ V.t() + b, "the output is plain LoRA's x (W + s·B A)ᵀ + b: the magnitude/norm rescaling is missing",
         "multiply x Vᵀ by magnitude / ‖V‖ (one factor per output feature)"),
        (x @ (V / V.norm(dim=1, keepdim=True)).t() + b, "the magnitude is missing: the output uses V/‖V‖ alone",
         "multiply by magnitude: W' = m · V / ‖V‖"),
    ]  # fmt: skip


def check_dora_forward(fn: Callable[..., torch.Tensor]) -> CheckResult:
    """Check ``fn(x, weight, bias, lora_A, lora_B, magnitude, scaling)``: DoRA's output
    ``(m / ‖V‖) ⊙ x Vᵀ + b`` with ``V = W + s·B A`` and ``‖V‖`` the norm of each output row,
    detached from the gradient graph (PEFT and the paper's §4.3)."""
    return _run_check(_title("check_dora_forward", fn, "fn"), _check_dora, fn)


def _check_dora(result: CheckResult, fn: Callable[..., torch.Tensor], generator: torch.Generator) -> None:
    layer, t = _dora_case(generator)
    s = layer.lora.scaling
    error, y = _attempt(fn, t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], s)
    if error is not None or not isinstance(y, torch.Tensor):
        axis = error is not None and "must match the size" in error
        result.fail(
            f"fn {error or f'returned a {type(y).__name__}, not a tensor'}"
            + (": the norm has in_features entries, so it was taken over the wrong axis" if axis else ""),
            "PyTorch stores W as (out, in): the paper's column norm (one per output feature) is "
            "torch.linalg.norm(V, dim=1)"
            if axis
            else "return (magnitude / norm) * (x @ V.T) + bias with V = weight + scaling * lora_B @ lora_A",
        )
        return
    expected = layer(t["x"])
    if y.shape != expected.shape:
        wrong_axis = "" if y.dim() < 2 or y.shape[-1] != _IN else ": the norm was taken over the wrong axis"
        result.fail(
            f"the output has shape {_shape_or_type(y)}, expected {tuple(expected.shape)}{wrong_axis}",
            "x @ V.T has one column per output feature; the norm has out_features entries (dim=1)",
        )
        return
    if not _close(y.detach(), expected.detach(), 1e-8):
        mistakes = _dora_mistakes(t, s)
        problem, hint = next(((p, h) for out, p, h in mistakes if _close(y.detach(), out, 1e-8)), (None, None))
        result.fail(
            problem or "the output differs from (m/‖W + s·B A‖)·x (W + s·B A)ᵀ + b",
            hint or "norm = torch.linalg.norm(V, dim=1); y = (magnitude / norm) * (x @ V.T) + bias",
        )
        return
    result.ok("the output is (m/‖W + s·B A‖) · x (W + s·B A)ᵀ + b, with one norm per output feature")
    # The gradient of A through the student's output against the layer's (PEFT's: the norm detached).
    # t["lora_A"] is the layer's own parameter, so its .grad is read and cleared between the two.
    layer.zero_grad()
    if y.requires_grad:
        y.sum().backward()
    student = None if layer.lora.lora_A.grad is None else layer.lora.lora_A.grad.clone()
    layer.zero_grad()
    layer(t["x"]).sum().backward()
    if student is None:
        result.fail("no gradient reaches lora_A through your output", "compute with the tensors given (no .detach())")
    elif _close(student, layer.lora.lora_A.grad, 1e-8):
        result.ok("the gradients of A and B treat ‖V‖ as a constant (detached), as PEFT does")
    else:
        result.fail(
            "lora_A's gradient differs from PEFT's: the norm ‖V‖ is not detached",
            "norm = torch.linalg.norm(V, dim=1).detach(): the paper (§4.3) treats it as a constant in backward",
        )


def check_nf4_quantize(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]) -> CheckResult:
    """Check ``fn(weight, block_size) -> (indices, absmax)``: one code-book index (0–15) per weight
    of the flattened weight and one absmax per block, as :func:`lora_lab.lora.nf4.quantize_nf4`."""
    return _run_check(_title("check_nf4_quantize", fn, "fn"), _check_nf4, fn)


def _check_nf4(result: CheckResult, fn: Callable, generator: torch.Generator) -> None:
    weight = torch.randn(8, 32, generator=generator) * torch.linspace(0.1, 3.0, 8).unsqueeze(1)  # blocks differ
    reference = quantize_nf4(weight, block_size=64)
    codes = reference.codes
    indices = torch.stack([codes >> 4, codes & 0x0F], dim=1).view(-1).long()
    error, got = _attempt(fn, weight, 64)
    if error is not None or not (isinstance(got, tuple | list) and len(got) == 2):
        result.fail(
            f"fn {error or 'did not return a pair (indices, absmax)'}",
            "return (indices, absmax): the nearest level of w / absmax of its block, and the absmaxes",
        )
        return
    got_indices, got_absmax = (_as_tensor(value) for value in got)
    if got_absmax is None or got_absmax.numel() != reference.absmax.numel():
        whole = got_absmax is not None and got_absmax.numel() == 1
        result.fail(
            f"absmax has {got_absmax.numel() if got_absmax is not None else 'no'} entries, expected "
            f"{reference.absmax.numel()} (one per block of 64)"
            + (": one absmax for the whole tensor" if whole else ""),
            "blocks = weight.reshape(-1, block_size); absmax = blocks.abs().amax(dim=1)",
        )
        return
    if not _close(got_absmax.reshape(-1).float(), reference.absmax, 1e-6):
        plain = weight.reshape(-1, 64).amax(dim=1)
        without_abs = _close(got_absmax.reshape(-1).float(), plain, 1e-6)
        result.fail(
            "absmax is the largest value, not the largest |value|" if without_abs else "absmax is wrong",
            "absmax = blocks.abs().amax(dim=1): negative weights count too",
        )
        return
    result.ok("one absmax per block of 64: max |w| of the block")
    if got_indices is None or got_indices.numel() != weight.numel():
        result.fail(
            f"indices: expected {weight.numel()} (one per weight), got {_shape_or_type(got[0])}",
            "return one index per weight, in the flattened order",
        )
        return
    got_indices = got_indices.reshape(-1).long()
    if torch.equal(got_indices, indices):
        restored = dequantize_nf4(reference)
        result.ok(
            f"every index is the nearest NF4 level of w/absmax (round trip error ≤ "
            f"{(restored - weight).abs().max().item():.3f} here)"
        )
        return
    code = nf4_code_book()
    unnormalised = (weight.reshape(-1, 1) - code).abs().argmin(dim=1)
    if torch.equal(got_indices, unnormalised):
        result.fail(
            "the indices round w itself, not w / absmax, to the nearest level",
            "divide each block by its absmax first: the levels live in [-1, 1]",
        )
    else:
        wrong = int((got_indices != indices).sum())
        result.fail(
            f"{wrong} of {weight.numel()} indices are not the nearest level of w / absmax",
            "index = (normalised.unsqueeze(-1) - code).abs().argmin(-1)",
        )
