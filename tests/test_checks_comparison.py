"""Notebooks 05 and 06's graders: each passes the reference answer and fails, with its hint, on each
typical mistake; the prediction graders measure afresh when given an experiment."""

from __future__ import annotations

import pytest
import torch

from lora_lab.checks import check_forgetting_prediction, check_rslora_prediction, check_subspace_similarity
from lora_lab.checks.comparison import RSLORA_DEMO, measured_forgetting, rslora_demo_recipes
from lora_lab.checks.grading import grade
from lora_lab.experiment import stages

FORGETTING = {"lora": 1.47, "full": 1.77}  # the committed cpu run's source-loss rise, nats
RSLORA = {"r=8, alpha/r": 5.582, "r=64, alpha/r": 5.389, "r=64, alpha/sqrt(r)": 2.540}


def _vh(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(A, full_matrices=False).Vh


def phi(A1, A2, i, j):
    return float((_vh(A1)[:i] @ _vh(A2)[:j].T).pow(2).sum() / min(i, j))


MISTAKES = {
    "not normalised": lambda A1, A2, i, j: float((_vh(A1)[:i] @ _vh(A2)[:j].T).pow(2).sum()),
    "max(i, j) instead": lambda A1, A2, i, j: phi(A1, A2, i, j) * min(i, j) / max(i, j),
    "not squared": lambda A1, A2, i, j: float((_vh(A1)[:i] @ _vh(A2)[:j].T).norm() / min(i, j)),
    "columns": lambda A1, A2, i, j: float((_vh(A1)[:, :i].T @ _vh(A2)[:, :j]).pow(2).sum() / min(i, j)),
    "rows of A themselves": lambda A1, A2, i, j: float((A1[:i] @ A2[:j].T).pow(2).sum() / min(i, j)),
    "left-singular": lambda A1, A2, i, j: float(
        (torch.linalg.svd(A1).U[:, :i].T @ torch.linalg.svd(A2).U[:, :j]).pow(2).sum() / min(i, j)
    ),
}


def test_subspace_similarity_passes_the_reference_and_a_0d_tensor():
    assert check_subspace_similarity(phi)
    assert check_subspace_similarity(lambda A1, A2, i, j: torch.tensor(phi(A1, A2, i, j)))
    grade("check_subspace_similarity", phi)


@pytest.mark.parametrize("problem", MISTAKES)
def test_subspace_similarity_names_each_mistake(problem):
    result = check_subspace_similarity(MISTAKES[problem])
    assert not result and problem in result.failed[0][0], result.report()
    with pytest.raises(AssertionError, match="hint"):
        grade("check_subspace_similarity", MISTAKES[problem])


def test_subspace_similarity_catches_swapped_arguments_and_in_place_changes_and_stubs():
    swapped = check_subspace_similarity(lambda A1, A2, i, j: phi(A1, A2, j, i) if i <= A1.shape[0] and j <= A2.shape[0]
                                        and j <= A1.shape[0] and i <= A2.shape[0] else phi(A1, A2, i, j))  # fmt: skip
    assert not swapped

    def in_place(A1, A2, i, j):
        value = phi(A1, A2, i, j)
        A1.mul_(2)
        return value

    assert "changed A1 or A2" in check_subspace_similarity(in_place).failed[0][0]

    def stub(A1, A2, i, j):
        raise NotImplementedError()

    assert "raise NotImplementedError()" in check_subspace_similarity(stub).failed[0][1]
    assert "not a number" in check_subspace_similarity(lambda *args: "0.5").failed[0][0]


def test_forgetting_prediction_passes_a_close_prediction():
    assert check_forgetting_prediction({"lora": 1.5, "full": 1.8}, FORGETTING)
    grade("check_forgetting_prediction", {"lora": 1.0, "full": 2.5}, FORGETTING)


@pytest.mark.parametrize(
    ("predicted", "problem", "hint"),
    [
        ({"lora": 0.0, "full": 1.8}, "LoRA forgets (almost) nothing", "W is frozen"),
        ({"lora": 1.8, "full": 1.5}, "the other order", "every weight"),
        ({"lora": 1.6, "full": 1.6}, "equal forgetting", "every weight"),
        ({"lora": 5.0, "full": 6.0}, "more than twice too much", "Δ source"),
        ({"lora": 0.5, "full": 0.6}, "less than half", "keeps the source"),
        ({"lora": 1.5}, "expected a dict with the keys", "two numbers"),
        ({"lora": "1.5", "full": 1.8}, "no finite number", "two numbers"),
        ([1.5, 1.8], "expected a dict", "two numbers"),
    ],
)
def test_forgetting_prediction_diagnoses_each_misconception(predicted, problem, hint):
    result = check_forgetting_prediction(predicted, FORGETTING)
    assert not result, result.report()
    assert any(problem in message and hint in tip for message, tip in result.failed), result.report()


def test_forgetting_prediction_explains_the_order_that_was_measured():
    """When LoRA is the one that forgets more (its recipe takes larger steps), the hint does not argue
    from full fine-tuning's freedom, which would point the other way."""
    lora_more = {"lora": 1.47, "full": 1.30}
    assert check_forgetting_prediction({"lora": 1.5, "full": 1.3}, lora_more)
    result = check_forgetting_prediction({"lora": 1.4, "full": 1.8}, lora_more)
    assert not result
    ((problem, hint),) = [(m, t) for m, t in result.failed if "the other order" in m]
    assert "LoRA forgets more by 0.17 nats" in problem and "how far training moves the model" in hint
    assert "every weight" not in hint


def test_forgetting_prediction_accepts_either_order_when_the_measurement_ties():
    assert check_forgetting_prediction({"lora": 1.5, "full": 1.45}, {"lora": 1.47, "full": 1.5})


def test_rslora_prediction_passes_the_reference_and_ties():
    assert check_rslora_prediction({"winner": "r=64, alpha/sqrt(r)", "rank_gain": 0.0}, RSLORA)
    tied = {**RSLORA, "r=64, alpha/r": 2.55}
    assert check_rslora_prediction({"winner": "r=64, alpha/r", "rank_gain": 0.75}, tied)


@pytest.mark.parametrize(
    ("predicted", "problem", "hint"),
    [
        ({"winner": "r=64, alpha/r", "rank_gain": 0.0}, "r=64, alpha/r wins", "8× less"),
        ({"winner": "r=8, alpha/r", "rank_gain": 0.0}, "r=8, alpha/r wins", "scaling·r·lr"),
        ({"winner": "r=64", "rank_gain": 0.0}, "not one of", "labels"),
        ({"winner": "r=64, alpha/sqrt(r)", "rank_gain": 1.0}, "gains 1 nats", "8× the parameters"),
        ({"winner": "r=64, alpha/sqrt(r)", "rank_gain": -0.5}, "gains -0.5 nats", "not wasted"),
        ({"winner": "r=64, alpha/sqrt(r)", "rank_gain": None}, "no finite number", "nats"),
        ({"winner": "r=64, alpha/sqrt(r)"}, "expected a dict", "rank_gain"),
    ],
)
def test_rslora_prediction_diagnoses_each_misconception(predicted, problem, hint):
    result = check_rslora_prediction(predicted, RSLORA)
    assert not result, result.report()
    assert any(problem in message and hint in tip for message, tip in result.failed), result.report()


def test_the_demo_recipes_are_the_three_labelled_runs():
    recipes = rslora_demo_recipes()
    assert list(recipes) == list(RSLORA_DEMO)
    assert [(r.rank, r.use_rslora, r.alpha, r.lr, r.epochs) for r in recipes.values()] == [
        (8, False, 16.0, 3e-3, 1.0), (64, False, 16.0, 3e-3, 1.0), (64, True, 16.0, 3e-3, 1.0)
    ]  # fmt: skip


def test_prediction_graders_measure_afresh_from_an_experiment(tmp_path):
    """Given an experiment, the grader measures the cached models itself (what the hidden tests pass)."""
    exp = stages.prepare("builtin", "smoke", cache=tmp_path, progress=False)
    measured = measured_forgetting(exp)
    assert set(measured) == {"lora", "full"} and all(value == value for value in measured.values())
    assert check_forgetting_prediction(dict(measured), exp)
    wrong = {key: value + 1.0 for key, value in measured.items()}  # a nat off: wrong whatever smoke measures
    assert not check_forgetting_prediction(wrong, exp)
