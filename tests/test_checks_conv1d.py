"""The grader of notebook 08's exercise, ``check_conv1d_merge``: right answers pass, each typical mistake fails
with its diagnosis, and the student's code is never allowed to raise through the check."""

from __future__ import annotations

import pytest
import torch

from lora_lab.checks import check_conv1d_merge


def right(weight, lora_A, lora_B, scaling):
    return weight + scaling * (lora_B @ lora_A).T


def also_right(weight, lora_A, lora_B, scaling):
    return weight + scaling * lora_A.T @ lora_B.T  # (B A)ᵀ = Aᵀ Bᵀ


def in_place(weight, lora_A, lora_B, scaling):
    weight += scaling * (lora_B @ lora_A).T
    return weight


def stub(weight, lora_A, lora_B, scaling):
    raise NotImplementedError()


SQUARE = ((8, 8, 3, 0.5),)
MISTAKES = {
    "untransposed, wide layer": (lambda w, a, b, s: w + s * (b @ a), None, "B @ A is (out, in)"),
    "untransposed, square layer": (lambda w, a, b, s: w + s * (b @ a), SQUARE, "silently wrong"),
    "no scaling": (lambda w, a, b, s: w + (b @ a).T, None, "forgot the scaling"),
    "only the update": (lambda w, a, b, s: s * (b @ a).T, None, "returned only the update"),
    "in place": (in_place, None, "changed `weight` in place"),
    "not written": (stub, None, "replace `raise NotImplementedError()`"),
    "nothing returned": (lambda w, a, b, s: None, None, "returned NoneType"),
}


@pytest.mark.parametrize("fn", [right, also_right])
def test_right_answers_pass(fn, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.random.get_rng_state()
    result = check_conv1d_merge(fn)
    assert result and len(result.passed) == 2 and not result.failed
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "All 2 passed." in capsys.readouterr().out


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_mistake_is_named(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    fn, cases, diagnosis = MISTAKES[case]
    result = check_conv1d_merge(fn, **({"cases": cases} if cases else {}))
    assert not result
    problem, hint = result.failed[0]
    assert diagnosis in problem + " " + hint
    assert "FAIL" in capsys.readouterr().out
