"""Tests for lora_lab.checks: the exercise checkers of notebooks 01 and 02.

Each checker must pass the reference solution (lora_lab's own classes, or the textbook
function) and fail *helpfully* on the typical mistakes: the printed report names the problem
and gives a hint, the returned result is falsy, and nothing is raised.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_lab.checks import (
    CheckResult,
    check_compression_ratio,
    check_lora_layer,
    check_lora_linear,
    check_lora_optimizer,
    check_merged_weight,
    check_model_lora_count,
    check_parameter_count,
    check_truncated_svd,
)
from lora_lab.checks.grading import grade
from lora_lab.lora.fused import FusedLoRALinear
from lora_lab.lora.layers import LoRALayer, LoRALinear


def _report(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out


def _assert_passes(result: CheckResult, out: str) -> None:
    assert result, out
    assert "FAIL" not in out and "hint:" not in out
    assert out.rstrip().endswith(f"All {len(result.passed)} passed.")


def _assert_fails(result: CheckResult, out: str, *phrases: str) -> None:
    """Falsy result, a FAIL line with a hint, and every phrase in the report."""
    assert not result, out
    assert result.failed
    assert "  FAIL  " in out and "        hint: " in out
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} not in the report:\n{out}"
    assert f"{len(result.failed)} failed, {len(result.passed)} passed." in out


# --- reference solutions, as a student would write them ---------------------------------------


class GoodLoRALayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int = 4, alpha: float = 1.0) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


class GoodLoRALinear(nn.Module):
    def __init__(self, original_layer: nn.Linear, rank: int = 4, alpha: float = 1.0) -> None:
        super().__init__()
        self.original_layer = original_layer
        self.lora = GoodLoRALayer(original_layer.in_features, original_layer.out_features, rank, alpha)
        for param in self.original_layer.parameters():
            param.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.original_layer(x) + self.lora(x)


def good_truncated_svd(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def good_count(model: nn.Module, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


# --- check_lora_layer -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoRALayer, GoodLoRALayer])
def test_lora_layer_passes_reference(cls, capsys) -> None:
    result = check_lora_layer(cls)
    out = _report(capsys)
    _assert_passes(result, out)
    assert "forward is factorised" in out and "(rank, in_features) = (3, 12)" in out


class SeedLayoutLayer(GoodLoRALayer):
    """The course's layer: A stored (in, rank), ΔW = B Aᵀ materialised."""

    def __init__(self, in_features, out_features, rank=4, alpha=1.0):
        super().__init__(in_features, out_features, rank, alpha)
        self.lora_A = nn.Parameter(torch.randn(in_features, rank) * 0.01)

    def forward(self, x):
        return x @ (self.lora_B @ self.lora_A.T).T * self.scaling


def test_lora_layer_names_transposed_A(capsys) -> None:
    _assert_fails(
        check_lora_layer(SeedLayoutLayer),
        _report(capsys),
        "lora_A has shape (12, 3)",
        "transposed",
        "(rank, in_features)",
    )


class NoScaling(GoodLoRALayer):
    def forward(self, x):
        return (x @ self.lora_A.T) @ self.lora_B.T


class InvertedScaling(GoodLoRALayer):
    def forward(self, x):
        return (x @ self.lora_A.T) @ self.lora_B.T / self.scaling  # r/α instead of α/r


@pytest.mark.parametrize(
    ("cls", "phrase"), [(NoScaling, "not scaled"), (InvertedScaling, "scaled by r/α instead of α/r")]
)
def test_lora_layer_names_wrong_scaling(cls, phrase, capsys) -> None:
    _assert_fails(check_lora_layer(cls), _report(capsys), phrase, "alpha / rank")


class RandomB(GoodLoRALayer):
    def __init__(self, in_features, out_features, rank=4, alpha=1.0):
        super().__init__(in_features, out_features, rank, alpha)
        self.lora_B = nn.Parameter(torch.randn(out_features, rank))


class BothZero(GoodLoRALayer):
    def __init__(self, in_features, out_features, rank=4, alpha=1.0):
        super().__init__(in_features, out_features, rank, alpha)
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))


def test_lora_layer_names_B_not_zero(capsys) -> None:
    _assert_fails(check_lora_layer(RandomB), _report(capsys), "lora_B is not zero at init", "zeros")


def test_lora_layer_names_A_zero_too(capsys) -> None:
    _assert_fails(check_lora_layer(BothZero), _report(capsys), "lora_A is zero at init too", "never start learning")


class Materialised(GoodLoRALayer):
    """Right shapes and values, but ΔW built on every call (the course's cost slip)."""

    def forward(self, x):
        return x @ (self.lora_B @ self.lora_A).T * self.scaling


class MaterialisedUntransposed(GoodLoRALayer):
    """x·ΔW instead of x·ΔWᵀ: only type-checks for square layers."""

    def forward(self, x):
        return x @ (self.lora_B @ self.lora_A) * self.scaling


def test_lora_layer_names_materialised_delta_w(capsys) -> None:
    result = check_lora_layer(Materialised)
    out = _report(capsys)
    _assert_fails(result, out, "builds ΔW = B·A (10×12)", "weight gradient", "never form B @ A")
    assert len(result.failed) == 1  # the values are right: only the cost is wrong


def test_lora_layer_names_untransposed_delta_w(capsys) -> None:
    _assert_fails(
        check_lora_layer(MaterialisedUntransposed),
        _report(capsys),
        "mat1 and mat2 shapes cannot be multiplied",
        "computes x·ΔW instead of x·ΔWᵀ",
        "in_features == out_features",
    )


class PlainTensors(nn.Module):
    def __init__(self, in_features, out_features, rank=4, alpha=1.0):
        super().__init__()
        self.lora_A = torch.randn(rank, in_features) * 0.01
        self.lora_B = torch.zeros(out_features, rank)
        self.scaling = alpha / rank

    def forward(self, x):
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


class Detached(GoodLoRALayer):
    def forward(self, x):
        return (x @ self.lora_A.detach().T) @ self.lora_B.T * self.scaling


class MatrixOnly(GoodLoRALayer):
    def forward(self, x):
        return torch.mm(torch.mm(x, self.lora_A.T), self.lora_B.T) * self.scaling


class Stub(GoodLoRALayer):
    def forward(self, x):
        raise NotImplementedError()


@pytest.mark.parametrize(
    ("cls", "phrases"),
    [
        (PlainTensors, ("lora_A is a Tensor, not an nn.Parameter", "nn.Parameter(...)")),
        (Detached, ("no gradient reaches lora_A", ".detach()")),
        (MatrixOnly, ("a 3-D input (batch, seq, in) = (2, 5, 12) raised RuntimeError", "broadcasts")),
        (
            Stub,
            ("raised NotImplementedError (the exercise is not written yet)", "replace `raise NotImplementedError()`"),
        ),
    ],
)
def test_lora_layer_names_other_mistakes(cls, phrases, capsys) -> None:
    _assert_fails(check_lora_layer(cls), _report(capsys), *phrases)


def test_lora_layer_reports_a_bad_constructor(capsys) -> None:
    class TwoArguments(GoodLoRALayer):
        def __init__(self, in_features, out_features):
            super().__init__(in_features, out_features)

    _assert_fails(
        check_lora_layer(TwoArguments), _report(capsys), "TypeError", "(in_features, out_features, rank, alpha)"
    )


@pytest.mark.parametrize(
    "run_check",
    [
        lambda: check_lora_layer(GoodLoRALayer),
        lambda: check_lora_linear(GoodLoRALinear),
        lambda: check_truncated_svd(good_truncated_svd),
        lambda: check_model_lora_count(good_count),  # adapts models: fresh A matrices draw random numbers
    ],
    ids=["lora_layer", "lora_linear", "truncated_svd", "model_lora_count"],
)
def test_checks_leave_the_global_rng_alone(run_check, capsys) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert run_check()
    assert torch.equal(torch.rand(3), expected)
    capsys.readouterr()


def test_reports_are_the_same_on_every_call(capsys) -> None:
    check_lora_layer(Materialised)
    first = _report(capsys)
    check_lora_layer(Materialised)
    assert _report(capsys) == first


# --- check_lora_linear ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoRALinear, GoodLoRALinear])
def test_lora_linear_passes_reference(cls, capsys) -> None:
    result = check_lora_linear(cls)
    out = _report(capsys)
    _assert_passes(result, out)
    assert "exactly the adapter's r·(in + out) = 66" in out


@pytest.mark.parametrize("cls", [LoRALinear, FusedLoRALinear], ids=["plain", "fused"])
def test_lora_linear_passes_lora_labs_own_layers(cls, capsys) -> None:
    _assert_passes(check_lora_linear(cls), _report(capsys))


class BaseNotFrozen(GoodLoRALinear):
    def __init__(self, original_layer, rank=4, alpha=1.0):
        super().__init__(original_layer, rank, alpha)
        for param in self.original_layer.parameters():
            param.requires_grad = True


class AdapterFrozen(GoodLoRALinear):
    def __init__(self, original_layer, rank=4, alpha=1.0):
        super().__init__(original_layer, rank, alpha)
        for param in self.parameters():
            param.requires_grad = False


class NoAdapterInForward(GoodLoRALinear):
    def forward(self, x):
        return self.original_layer(x)


class AdapterOnly(GoodLoRALinear):
    def forward(self, x):
        return self.lora(x)


class FreshLinear(GoodLoRALinear):
    def __init__(self, original_layer, rank=4, alpha=1.0):
        super().__init__(nn.Linear(original_layer.in_features, original_layer.out_features), rank, alpha)


class UnscaledLinear(GoodLoRALinear):
    def forward(self, x):
        return self.original_layer(x) + x @ self.lora.lora_A.T @ self.lora.lora_B.T


def test_lora_linear_names_base_not_frozen(capsys) -> None:
    result = check_lora_linear(BaseNotFrozen)
    _assert_fails(
        result, _report(capsys), "the base layer is not frozen", "original_layer.weight", "requires_grad = False"
    )
    assert any("after backward the base layer has gradients" in problem for problem, _ in result.failed)


@pytest.mark.parametrize(
    ("cls", "phrases"),
    [
        (AdapterFrozen, ("the adapter is frozen too", "not self.parameters()")),
        (NoAdapterInForward, ("the adapter never runs", "adapter's branch (self.lora)")),
        (AdapterOnly, ("the output is the adapter's alone", "LoRA adds ΔW x to W x")),
        (FreshLinear, ("original_layer is not the nn.Linear passed in", "pretrained weights")),
        (UnscaledLinear, ("not scaled", "alpha / rank")),
        (SeedLayoutLayer, ("TypeError", "(original_layer, rank=4, alpha=1.0)")),
    ],
)
def test_lora_linear_names_typical_mistakes(cls, phrases, capsys) -> None:
    _assert_fails(check_lora_linear(cls), _report(capsys), *phrases)


def test_lora_linear_catches_seed_layout_adapter(capsys) -> None:
    class SeedLinear(GoodLoRALinear):
        def __init__(self, original_layer, rank=4, alpha=1.0):
            super().__init__(original_layer, rank, alpha)
            self.lora = SeedLayoutLayer(original_layer.in_features, original_layer.out_features, rank, alpha)

    _assert_fails(check_lora_linear(SeedLinear), _report(capsys), "transposed", "run check_lora_layer on it")


# --- check_truncated_svd ----------------------------------------------------------------------


def test_truncated_svd_passes_reference(capsys) -> None:
    _assert_passes(check_truncated_svd(good_truncated_svd), _report(capsys))


def test_truncated_svd_accepts_numpy(capsys) -> None:
    import numpy as np

    def numpy_svd(M, r):
        U, S, Vh = np.linalg.svd(np.asarray(M), full_matrices=False)
        return (U[:, :r] * S[:r]) @ Vh[:r]

    _assert_passes(check_truncated_svd(numpy_svd), _report(capsys))


def _one_too_many(M, r):
    return good_truncated_svd(M, r + 1)


def _no_singular_values(M, r):
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ Vh[:r]


def _smallest(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]


def _columns_of_vh(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:, :r].T


def _no_truncation(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ torch.diag(S) @ Vh


def _in_place(M, r):
    M -= 0.0 * M + 1.0
    return good_truncated_svd(M, r)


def _factors(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


@pytest.mark.parametrize(
    ("fn", "phrases"),
    [
        (_one_too_many, ("has rank 2, expected 1 (one too many", "[:r]")),
        (_no_singular_values, ("the singular values are missing", "between the two factors")),
        (_smallest, ("SMALLEST singular values", "descending order")),
        (_columns_of_vh, ("columns of Vh instead of rows", "rows or its columns")),
        (_no_truncation, ("fn(M, 1) for a (20, 12) matrix has rank 12, expected 1", "keep exactly r")),
        (_in_place, ("modified its input M in place",)),
        (_factors, ("returned tuple", "not its factors")),
    ],
)
def test_truncated_svd_names_typical_mistakes(fn, phrases, capsys) -> None:
    _assert_fails(check_truncated_svd(fn), _report(capsys), *phrases)


def test_truncated_svd_names_a_non_optimal_rank_r_matrix(capsys) -> None:
    def random_rank_r(M, r):
        g = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(M.shape[0], r, generator=g, dtype=M.dtype))
        return Q @ Q.T @ M  # the best matrix with a RANDOM r-dimensional column space: rank r, not optimal

    _assert_fails(check_truncated_svd(random_rank_r), _report(capsys), "Eckart–Young", "LARGEST")


# --- parameter counts -------------------------------------------------------------------------


def test_parameter_count_passes_reference(capsys) -> None:
    _assert_passes(check_parameter_count(lambda d, k, r: r * (d + k)), _report(capsys))


@pytest.mark.parametrize(
    ("fn", "phrase"),
    [
        (lambda d, k, r: d * k, "the full weight matrix's count"),
        (lambda d, k, r: r * d * k, "r·d·k counts a full matrix per rank"),
        (lambda d, k, r: 2 * r * d, "assumes a square matrix"),
        (lambda d, k, r: r * (d + k) + d, "counts a bias"),
        (lambda d, k, r: r * (d + k) / 1, "returns a float"),
    ],
)
def test_parameter_count_names_typical_mistakes(fn, phrase, capsys) -> None:
    _assert_fails(check_parameter_count(fn), _report(capsys), phrase, "hint:")


def test_compression_ratio_passes_reference(capsys) -> None:
    _assert_passes(check_compression_ratio(lambda d, k, r: d * k / (r * (d + k))), _report(capsys))


@pytest.mark.parametrize(
    ("fn", "phrase"),
    [
        (lambda d, k, r: r * (d + k) / (d * k), "that is the inverse"),
        (lambda d, k, r: d * k // (r * (d + k)), "floor division"),
        (lambda d, k, r: math.sqrt(d * k) / r, "expected d·k / (r·(d + k))"),
    ],
)
def test_compression_ratio_names_typical_mistakes(fn, phrase, capsys) -> None:
    _assert_fails(check_compression_ratio(fn), _report(capsys), phrase, "which divided by which")


# --- check_model_lora_count -------------------------------------------------------------------


def test_model_lora_count_passes_reference(capsys) -> None:
    result = check_model_lora_count(good_count)
    out = _report(capsys)
    _assert_passes(result, out)
    assert "a 2-layer GPT: matches" in out


def _every_parameter(model, rank):
    return sum(p.numel() for p in model.parameters())


def _full_weights(model, rank):
    return sum(rank * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def _top_level_only(model, rank):
    return sum(rank * (m.in_features + m.out_features) for m in model.children() if isinstance(m, nn.Linear))


def _with_biases(model, rank):
    return good_count(model, rank) + sum(
        m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None
    )


def _freezes_the_model(model, rank):
    for param in model.parameters():
        param.requires_grad = False
    return good_count(model, rank)


@pytest.mark.parametrize(
    ("fn", "phrase"),
    [
        (_every_parameter, "every parameter of the model"),
        (_full_weights, "r·in·out per layer"),
        (_top_level_only, "only the top-level nn.Linear children"),
        (_with_biases, "adds the biases"),
        (_freezes_the_model, "fn changed a nested nn.Sequential MLP"),
    ],
)
def test_model_lora_count_names_typical_mistakes(fn, phrase, capsys) -> None:
    _assert_fails(check_model_lora_count(fn), _report(capsys), phrase, "hint:")


# --- the result object ------------------------------------------------------------------------


def test_check_result_is_falsy_when_empty_or_failed() -> None:
    result = CheckResult("demo")
    assert not result
    result.ok("one thing holds")
    assert result and result.passed == ["one thing holds"]
    result.fail("another does not", "fix it")
    assert not result and result.failed == [("another does not", "fix it")]
    assert repr(result) == "CheckResult('demo', passed=1, failed=1)"
    assert result.report().splitlines() == [
        "demo:",
        "  ok    one thing holds",
        "  FAIL  another does not",
        "        hint: fix it",
        "1 failed, 1 passed.",
    ]


# --- notebook 04's graders, the grading entry point and the diagnosis -------------------------------------


def _good_optimizer(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


@pytest.mark.parametrize(
    ("fn", "phrases"),
    [
        (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr), ("frozen parameters", "requires_grad is True")),
        (
            lambda m, lr: torch.optim.AdamW([p for n, p in m.named_parameters() if "lora" in n], lr=lr),
            ("LayerNorm unfrozen", "not by their name"),
        ),
        (lambda m, lr: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr), ("not a torch.optim",)),
        (lambda m, lr: _good_optimizer(m, 1e-3), ("another learning rate",)),
        (lambda m, lr: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad] * 2, lr=lr), ("twice",)),
    ],
    ids=["everything", "by-name", "adam", "lr", "twice"],
)
@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_lora_optimizer_names_the_mistake(fn, phrases, capsys) -> None:
    _assert_fails(check_lora_optimizer(fn), _report(capsys), *phrases)


def test_lora_optimizer_passes_the_solution(capsys) -> None:
    _assert_passes(check_lora_optimizer(_good_optimizer), _report(capsys))


def _merged(layer, scale=None, transpose=False, base=True):
    lora = layer.lora
    with torch.no_grad():
        delta = (lora.scaling if scale is None else scale) * lora.lora_B @ lora.lora_A
        merged = layer.weight + delta if base else delta
    return merged.T if transpose else merged


@pytest.mark.parametrize(
    ("fn", "phrases"),
    [
        (lambda layer: _merged(layer, scale=1.0), ("not scaled",)),
        (lambda layer: _merged(layer, scale=layer.lora.rank / layer.lora.alpha), ("r/α instead of α/r",)),
        (lambda layer: _merged(layer, base=False), ("W0 is missing",)),
        (lambda layer: _merged(layer, transpose=True), ("it is transposed",)),
        (lambda layer: layer.weight.add_(1.0), ("changed the layer",)),
    ],
    ids=["unscaled", "inverted", "no-base", "transposed", "in-place"],
)
def test_merged_weight_names_the_mistake(fn, phrases, capsys) -> None:
    _assert_fails(check_merged_weight(fn), _report(capsys), *phrases)


def test_merged_weight_passes_the_solution(capsys) -> None:
    _assert_passes(check_merged_weight(_merged), _report(capsys))


def test_lora_linear_on_the_reference_layer_is_not_failed_by_the_students_layer(capsys) -> None:
    """With layer_class, the wrapper is graded on lora_lab's LoRALayer, found under the name LoRALayer in the
    namespace the wrapper was defined in; the student's own binding is restored afterwards."""
    namespace = {"nn": nn, "LoRALayer": SeedLayoutLayer}
    exec(  # a wrapper defined in a namespace of its own, as in a notebook
        "class Wrapper(nn.Module):\n"
        "    def __init__(self, original_layer, rank=4, alpha=1.0):\n"
        "        super().__init__()\n"
        "        self.original_layer = original_layer\n"
        "        self.lora = LoRALayer(original_layer.in_features, original_layer.out_features, rank, alpha)\n"
        "        for p in original_layer.parameters():\n"
        "            p.requires_grad = False\n"
        "    def forward(self, x):\n"
        "        return self.original_layer(x) + self.lora(x)\n",
        namespace,
    )
    assert not check_lora_linear(namespace["Wrapper"])
    capsys.readouterr()
    result = check_lora_linear(namespace["Wrapper"], layer_class=LoRALayer)
    _assert_passes(result, _report(capsys))
    assert namespace["LoRALayer"] is SeedLayoutLayer


def test_diagnosis_lists_every_failure_with_its_hint() -> None:
    result = CheckResult("check_x(f)")
    result.ok("fine")
    result.fail("wrong shape", "look at the shape")
    expected = "check_x(f): 1 of 2 properties fail\n  FAIL  wrong shape\n        hint: look at the shape"
    assert result.diagnosis() == expected


def test_grade_raises_the_diagnosis_and_prints_nothing(capsys) -> None:
    grade("check_lora_optimizer", _good_optimizer)
    with pytest.raises(AssertionError, match=r"(?s)frozen\s+parameters.*hint: "):
        grade("check_lora_optimizer", lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr))
    assert capsys.readouterr().out == ""
    with pytest.raises(KeyError, match="known: check_apply_lora, check_compression_ratio"):
        grade("check_nothing", None)
