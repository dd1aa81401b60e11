"""Graders of notebook 01's low-rank exercises: truncated SVD, and what LoRA's factors cost.

``check_truncated_svd`` holds the student's best rank-``r`` approximation to Eckart–Young;
``check_parameter_count`` and ``check_compression_ratio`` hold two closed formulas, ``r·(d + k)``
and ``d·k / (r·(d + k))``, to a few weight shapes, from a tiny one to GPT-3's ``12288 × 12288``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral

import torch

from .result import (
    CheckResult,
    _as_tensor,
    _attempt,
    _close,
    _describe_error,
    _fmt,
    _is_number,
    _named_mistake,
    _printed,
    _run_check,
    _title,
)

# --- truncated SVD ----------------------------------------------------------------------------


def _svd_candidates(M: torch.Tensor, r: int) -> list[tuple[torch.Tensor, str, str]]:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return [
        (
            U[:, :r] @ Vh[:r],
            "the singular values are missing: U_r V_rᵀ without Σ_r",
            "M_r = U_r Σ_r V_rᵀ: the r singular values belong between the two factors (torch.diag, or broadcasting)",
        ),
        (
            U[:, -r:] * S[-r:] @ Vh[-r:],
            "it keeps the r SMALLEST singular values",
            "torch.linalg.svd returns them in descending order: which end of U, S and Vh holds the largest ones?",
        ),
        (
            U[:, :r] * S[:r] @ Vh[:, :r].T if Vh.shape[1] >= r else M,
            "it takes columns of Vh instead of rows",
            "torch.linalg.svd returns Vh = Vᵀ, not V: are the right singular vectors its rows or its columns?",
        ),
    ]


def check_truncated_svd(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> CheckResult:
    """Check ``fn(M, r)``, the best rank-``r`` approximation of ``M`` by truncated SVD.

    Properties, on seeded tall and wide float64 matrices and several ``r``: the result has M's
    shape; its rank is exactly ``r`` (an off-by-one is named); its error obeys Eckart–Young,
    ``‖M − M_r‖_F² = Σ_{i>r} σ_i²`` (forgetting Σ, keeping the smallest values, or confusing V
    and Vᵀ are named); ``r = min(d, k)`` gives M back; and the input is left unchanged.
    """
    return _run_check(_title("check_truncated_svd", fn, "fn"), _check_truncated_svd, fn)


def _truncated_svd_case(
    result: CheckResult, fn: Callable[[torch.Tensor, int], torch.Tensor], M: torch.Tensor, r: int
) -> bool:
    """Check ``fn(M, r)`` for one matrix; report the first failure and return False, or True."""
    given, shape = M.clone(), tuple(M.shape)
    error, value = _attempt(fn, given, r)
    if error is not None:
        result.fail(
            f"fn(M, {r}) for a {shape} matrix {error}",
            "torch.linalg.svd(M, full_matrices=False) gives U, S, Vh; build M_r from the first r of each",
        )
        return False
    approx = _as_tensor(value)
    if approx is None or tuple(approx.shape) != shape:
        got = tuple(approx.shape) if approx is not None else type(value).__name__
        result.fail(
            f"fn(M, {r}) for a {shape} matrix returned {got}, expected a {shape} tensor",
            "return the approximation itself (same shape as M), not its factors; Vh holds the right singular "
            "vectors as rows",
        )
        return False
    if not torch.equal(given, M):
        result.fail("fn modified its input M in place", "work on the SVD's outputs; leave M as it is")
        return False
    approx = approx.to(torch.float64)
    got = int(torch.linalg.matrix_rank(approx).item())
    if got != r:
        off = {r + 1: " (one too many: keep indices 0..r-1, i.e. [:r])", r - 1: " (one too few)"}.get(got, "")
        result.fail(
            f"fn(M, {r}) for a {shape} matrix has rank {got}, expected {r}{off}",
            "keep exactly r singular triplets (σ_i with its column of U and its row of Vh); count your slices",
        )
        return False
    S = torch.linalg.svdvals(M)
    best = (S[r:] ** 2).sum()
    error = ((M - approx) ** 2).sum()
    if torch.isclose(error, best, rtol=1e-6, atol=1e-9):
        return True
    for candidate, problem, hint in _svd_candidates(M, r):
        if _close(approx, candidate, tol=1e-8):
            result.fail(f"fn(M, {r}) is rank {r} but not the best: {problem}", hint)
            return False
    result.fail(
        f"fn(M, {r}) has ‖M − M_r‖_F² = {error.item():.4g}, but the best rank-{r} approximation "
        f"has Σ_{{i>r}} σ_i² = {best.item():.4g} (Eckart–Young)",
        "Eckart–Young: keep the r LARGEST singular values, each with its own pair of singular vectors",
    )
    return False


def _check_truncated_svd(
    result: CheckResult, fn: Callable[[torch.Tensor, int], torch.Tensor], generator: torch.Generator
) -> None:
    tall = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    wide = torch.randn(9, 15, generator=generator, dtype=torch.float64)
    # Case by case, each property in turn, stopping at the first failure: the tall cases come
    # first, so a value mistake is named there before a wide matrix turns it into a shape error.
    for M, r in [(tall, 1), (tall, 3), (tall, 7), (wide, 2), (wide, 5)]:
        if not _truncated_svd_case(result, fn, M, r):
            return
    result.ok("returns a matrix of M's shape, for tall (20×12) and wide (9×15) M; M left unchanged")
    result.ok("the result has rank exactly r (r = 1, 3, 7 and 2, 5)")
    result.ok("‖M − M_r‖_F² = Σ_{i>r} σ_i²: the best rank-r approximation (Eckart–Young)")

    full = 12
    try:
        restored = _as_tensor(fn(tall.clone(), full))
        exact = restored is not None and _close(restored.to(torch.float64), tall, tol=1e-8)
    except Exception as error:
        result.fail(f"fn(M, {full}) (full rank) {_describe_error(error)}", "r = min(d, k) keeps every singular value")
        return
    if exact:
        result.ok("r = min(d, k) gives M back")
    else:
        result.fail(f"fn(M, {full}) for a 20×12 M does not give M back", "r = min(d, k) keeps every singular value")


# --- parameter counts -------------------------------------------------------------------------

_COUNT_CASES = ((768, 768, 4), (4096, 11008, 8), (10, 6, 2), (12288, 12288, 1))


@dataclass(frozen=True)
class _Formula:
    """A closed formula in ``(d, k, r)`` that the student's ``fn(d, k, r)`` must compute."""

    text: str  # as printed, e.g. "r·(d + k)"
    value: Callable[[int, int, int], float]
    matches: Callable[[float, float], bool]  # (got, expected), got already known to be a number
    mistake: Callable[[object, int, int, int, float], str]  # ": what a wrong got means", or ""
    shown: Callable[[float], str]  # how the expected value is printed
    error_hint: str  # when fn raises
    hint: str  # when fn returns a wrong value


def _count_mistake(got: object, d: int, k: int, r: int, expected: float) -> str:
    mistakes = {
        d * k: "that is d·k, the full weight matrix's count",
        r * d * k: "r·d·k counts a full matrix per rank; the factors have r·d and r·k entries",
        2 * r * d: "2·r·d assumes a square matrix (d = k)",
        2 * r * k: "2·r·k assumes a square matrix (d = k)",
        expected + d: "that counts a bias of size d as well; LoRA trains only A and B",
    }
    return _named_mistake(got, mistakes, f"returned a {type(got).__name__}, not a number")


def _ratio_mistake(got: object, d: int, k: int, r: int, expected: float) -> str:
    if _is_number(got) and got != 0 and math.isclose(got, 1 / expected, rel_tol=1e-9):
        return ": that is the inverse, LoRA's count over the full count"
    if _is_number(got) and got == d * k // (r * (d + k)):
        return ": floor division (//) drops the fraction"
    return ""


_PARAMETER_COUNT = _Formula(
    text="r·(d + k)",
    value=lambda d, k, r: r * (d + k),
    matches=lambda got, expected: got == expected,
    mistake=_count_mistake,
    shown=str,
    error_hint="B is d×r and A is r×k: count their entries",
    hint="B ∈ R^(d×r) has d·r entries and A ∈ R^(r×k) has r·k: together r·(d + k)",
)

_COMPRESSION_RATIO = _Formula(
    text="d·k / (r·(d + k))",
    value=lambda d, k, r: d * k / (r * (d + k)),
    matches=lambda got, expected: math.isclose(got, expected, rel_tol=1e-9),
    mistake=_ratio_mistake,
    shown=_fmt,
    error_hint="divide the full count d·k by LoRA's r·(d + k)",
    hint="full fine-tuning trains d·k parameters and LoRA r·(d + k): which divided by which?",
)


def _check_formula(result: CheckResult, fn: Callable[[int, int, int], float], formula: _Formula) -> bool:
    """Compare ``fn`` with ``formula`` case by case, reporting the first wrong case; True if none."""
    for d, k, r in _COUNT_CASES:
        error, got = _attempt(fn, d, k, r)
        if error is not None:
            result.fail(f"fn({d}, {k}, {r}) {error}", formula.error_hint)
            return False
        expected = formula.value(d, k, r)
        if _is_number(got) and formula.matches(got, expected):
            continue
        result.fail(
            f"fn({d}, {k}, {r}) = {got!r}, expected {formula.text} = {formula.shown(expected)}"
            f"{formula.mistake(got, d, k, r, expected)}",
            formula.hint,
        )
        return False
    result.ok(f"fn(d, k, r) = {formula.text} for " + ", ".join(f"({d}, {k}, {r})" for d, k, r in _COUNT_CASES))
    return True


# These two draw no random numbers of their own, so they call fn outside _run_check, on the
# notebook's own random state, as they always have.


def check_parameter_count(fn: Callable[[int, int, int], int]) -> CheckResult:
    """Check ``fn(d, k, r)``: the trainable parameters of a rank-``r`` LoRA on a ``d × k`` weight,
    ``r·(d + k)`` (B is d×r, A is r×k). Typical mistakes are named: the full ``d·k``, ``r·d·k``,
    a square-only ``2·r·d``, or counting a bias."""
    result = CheckResult(_title("check_parameter_count", fn, "fn"))
    if _check_formula(result, fn, _PARAMETER_COUNT):
        if all(isinstance(fn(d, k, r), Integral) for d, k, r in _COUNT_CASES):
            result.ok("returns an int")
        else:
            result.fail("returns a float; a parameter count is an int", "use integer arithmetic (no /)")
    return _printed(result)


def check_compression_ratio(fn: Callable[[int, int, int], float]) -> CheckResult:
    """Check ``fn(d, k, r)``: how many times fewer parameters LoRA trains than full fine-tuning
    of a ``d × k`` weight, ``d·k / (r·(d + k))``. The inverse and floor division are named."""
    result = CheckResult(_title("check_compression_ratio", fn, "fn"))
    _check_formula(result, fn, _COMPRESSION_RATIO)
    return _printed(result)
