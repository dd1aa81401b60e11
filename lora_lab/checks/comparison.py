"""Graders of notebooks 05 and 06: two "predict, then run" questions and Hu et al.'s subspace similarity.

A prediction is recorded before the run it is about and graded against what was measured. The
prediction graders accept the measurement either as numbers (what the notebook printed) or as an
:class:`~lora_lab.experiment.stages.Experiment`, from which they measure it afresh through the cached
stages: a hidden test passes a freshly prepared experiment, so no rebound notebook variable can
stand in for the measurement. A prediction passes when it is right where the measurement is clear
and close enough in size; each typical misconception gets its own diagnosis.

* :func:`check_forgetting_prediction` (notebook 05) — how much the tuned LoRA model and full
  fine-tuning forget of the source domain, in nats (:func:`measured_forgetting`);
* :func:`check_subspace_similarity` (notebook 05) — the student's φ(A1, A2, i, j) of the paper's §7.2
  against :func:`lora_lab.analysis.subspace_similarity`;
* :func:`check_rslora_prediction` (notebook 06) — which of three short runs (rank 8 and 64 with α/r,
  rank 64 with α/√r, :func:`rslora_demo_recipes`) learns most, and what rank 64 gains under α/r
  (:func:`measured_rslora`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..analysis.low_rank import subspace_similarity
from ..experiment.config import LoRARecipe
from ..experiment.stages import Experiment, full_finetuned, lora_finetuned, pretrained_base
from ..training import perplexity
from .result import CheckResult, _attempt, _is_number, _printed, _private_rng, _scalar, _title

__all__ = [
    "check_forgetting_prediction",
    "check_subspace_similarity",
    "check_rslora_prediction",
    "measured_forgetting",
    "measured_rslora",
    "rslora_demo_recipes",
    "RSLORA_DEMO",
]

#: Notebook 06's three short runs, fixed here (not taken from the profile) so that the comparison and
#: its grader use one definition: label -> (rank, use_rslora), with α = 16, lr 3e-3 and one epoch.
RSLORA_DEMO: dict[str, tuple[int, bool]] = {
    "r=8, alpha/r": (8, False),
    "r=64, alpha/r": (64, False),
    "r=64, alpha/sqrt(r)": (64, True),
}
_RS_ALPHA, _RS_LR, _RS_EPOCHS = 16.0, 3e-3, 1.0

# Differences (nats) below these are treated as ties: one seed cannot rank them.
_ORDER_TIE = 0.1
_WINNER_TIE = 0.05


def rslora_demo_recipes() -> dict[str, LoRARecipe]:
    """:data:`RSLORA_DEMO` as recipes (each named by its label): α = 16, lr 3e-3, one epoch."""
    return {
        label: LoRARecipe(label, rank, _RS_ALPHA, _RS_LR, epochs=_RS_EPOCHS, use_rslora=rslora)
        for label, (rank, rslora) in RSLORA_DEMO.items()
    }


def measured_forgetting(exp: Experiment) -> dict[str, float]:
    """How much the tuned LoRA model (recipe ``lora``) and full fine-tuning forget: the rise of their
    source validation loss over the base's, in nats (``ln`` of the ratio of source perplexities),
    from the cached stages (trained first if the cache lacks them)."""
    base = pretrained_base(exp)
    block = exp.profile.model.block_size

    def source_loss(model: torch.nn.Module) -> float:
        return math.log(perplexity(model, exp.splits.source_val, block, device=exp.device))

    start = source_loss(base.model)
    return {
        "lora": source_loss(lora_finetuned(exp, base, "lora").model) - start,
        "full": source_loss(full_finetuned(exp, base).model) - start,
    }


def measured_rslora(exp: Experiment) -> dict[str, float]:
    """Target validation perplexity of each of :func:`rslora_demo_recipes`' runs, from the cache."""
    base = pretrained_base(exp)
    block = exp.profile.model.block_size
    return {
        label: perplexity(lora_finetuned(exp, base, recipe).model, exp.splits.target_val, block, device=exp.device)
        for label, recipe in rslora_demo_recipes().items()
    }


def _numbers(result: CheckResult, predicted: object, keys: tuple[str, ...], what: str) -> dict[str, float] | None:
    """``predicted`` as ``{key: float}``, or None after recording what is wrong with it."""
    if not isinstance(predicted, Mapping) or set(predicted) != set(keys):
        got = sorted(map(str, predicted)) if isinstance(predicted, Mapping) else type(predicted).__name__
        result.fail(f"the prediction is {got}, expected a dict with the keys {list(keys)}", f"write {what}")
        return None
    bad = [key for key in keys if not _is_number(predicted[key]) or not math.isfinite(predicted[key])]
    if bad:
        result.fail(f"the prediction for {bad} is no finite number", f"write {what}")
        return None
    return {key: float(predicted[key]) for key in keys}


# --- notebook 05: forgetting -----------------------------------------------------------------------


def check_forgetting_prediction(predicted: object, measured: Experiment | Mapping[str, float]) -> CheckResult:
    """Check a prediction ``{"lora": nats, "full": nats}`` of how far each method's source validation loss
    rises over the base's, against ``measured`` (numbers as :func:`measured_forgetting` returns them, or
    an Experiment to measure). It must say that LoRA forgets too, rank the two as measured (unless they
    are within 0.1 nats), and be within a factor of 2 of each measured value."""
    result = CheckResult("check_forgetting_prediction")
    if isinstance(measured, Experiment):
        measured = measured_forgetting(measured)
    guess = _numbers(result, predicted, ("lora", "full"), '{"lora": nats, "full": nats}, two numbers')
    if guess is None:
        return _printed(result)
    truth = {key: float(measured[key]) for key in ("lora", "full")}
    shown = ", ".join(f"{key} {truth[key]:.2f}" for key in truth)
    if truth["lora"] > 0.1 and guess["lora"] <= 0.1 * truth["lora"]:
        result.fail(
            f"you predicted that LoRA forgets (almost) nothing ({guess['lora']:g} nats); measured: {shown}",
            "W is frozen, but the adapted model computes W x + (α/r)·B A x on every input, source text "
            "included: the update that helps the target changes the source predictions too",
        )
    elif truth["lora"] > 0.1:
        result.ok("LoRA forgets too: frozen weights are not a frozen model")
    gap, guessed_gap = truth["full"] - truth["lora"], guess["full"] - guess["lora"]
    if abs(gap) >= _ORDER_TIE and not guessed_gap * gap > 0:
        more = "full fine-tuning" if gap > 0 else "LoRA"
        hint = (
            "at (nearly) equal target perplexity, which method can move more of the model: a rank-r update of "
            "the linear layers, or every weight, embeddings and LayerNorms included?"
            if gap > 0
            else "forgetting follows how far training moves the model, not how many weights it may move: compare "
            "the steps each method takes (its learning rate, and for LoRA the scale α/r too), each picked by the "
            "same sweep for the target alone"
        )
        result.fail(
            f"you predicted {'equal forgetting' if guessed_gap == 0 else 'the other order'}; measured: {shown} "
            f"({more} forgets more by {abs(gap):.2f} nats)",
            hint,
        )
    else:
        result.ok("the order of the two matches the measurement (or they are within 0.1 nats)")
    for key, label in (("lora", "LoRA"), ("full", "full fine-tuning")):
        if truth[key] <= 0.05:  # nothing measurable was forgotten: a small guess is right
            if abs(guess[key] - truth[key]) <= 0.1:
                result.ok(f"{label} forgets (almost) nothing, as measured ({truth[key]:.2f} nats)")
            else:
                result.fail(f"{label}: predicted {guess[key]:g} nats, measured {truth[key]:.2f}",
                            "this run barely moved the model: look at its target perplexity first")  # fmt: skip
        elif guess[key] > 0 and abs(math.log(guess[key] / truth[key])) <= math.log(2):
            result.ok(f"{label}'s forgetting within a factor of 2: predicted {guess[key]:g}, measured {truth[key]:.2f}")
        elif key == "lora" and guess[key] <= 0.1 * truth[key]:
            continue  # "LoRA forgets nothing", diagnosed above
        elif guess[key] > 2 * truth[key]:
            result.fail(
                f"{label}: predicted {guess[key]:g} nats, measured {truth[key]:.2f}: more than twice too much",
                "the base's source loss is near its floor and fine-tuning ran 30 short epochs: read the Δ source "
                "of notebook 04 (as a log ratio) before guessing",
            )
        else:
            result.fail(
                f"{label}: predicted {guess[key]:g} nats, measured {truth[key]:.2f}: less than half",
                "nothing in the training keeps the source in mind: every step pushes toward the target only",
            )
    return _printed(result)


# --- notebook 05: subspace similarity ---------------------------------------------------------------

_CASES = ((5, 5, 9, 4, 2), (4, 6, 10, 2, 3), (3, 8, 12, 3, 5), (6, 6, 7, 6, 6))  # r1, r2, k, i, j


def _mistakes(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> list[tuple[Callable[[], float], str, str]]:
    """What the typical wrong formulas give, with the diagnosis of each (tried in this order)."""

    def right_vectors(A: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(A.double(), full_matrices=False).Vh

    def overlap(U1: torch.Tensor, U2: torch.Tensor) -> float:
        return float((U1.T @ U2).pow(2).sum())

    V1, V2 = right_vectors(A1).T, right_vectors(A2).T  # columns: the singular vectors in R^k
    exact = overlap(V1[:, :i], V2[:, :j])
    mistakes = [
        (lambda: exact, "it is not normalised: ‖U1ᵀU2‖_F² without the division by min(i, j)",
         "divide by min(i, j), so that one subspace inside the other gives 1"),
        (lambda: exact / max(i, j), "it divides by max(i, j) instead of min(i, j)",
         "the largest possible overlap is min(i, j): one subspace inside the other"),
        (lambda: math.sqrt(exact) / min(i, j), "the Frobenius norm is not squared",
         "the paper's φ uses the squared norm (the sum of squared cosines)"),
        (lambda: overlap(right_vectors(A1)[:, :i], right_vectors(A2)[:, :j]) / min(i, j),
         "it takes the first i *columns* of Vh, not its first i rows (the singular vectors)",
         "torch.linalg.svd returns Vh: the right-singular vectors are its rows"),
        (lambda: overlap(A1.double()[:i].T, A2.double()[:j].T) / min(i, j),
         "it uses the rows of A themselves, which are neither orthonormal nor ordered by importance",
         "take the singular value decomposition first: U^i are its top-i right-singular vectors"),
    ]  # fmt: skip
    if A1.shape[0] == A2.shape[0]:  # the left vectors only fit together when both ranks agree
        U1 = torch.linalg.svd(A1.double(), full_matrices=False).U
        U2 = torch.linalg.svd(A2.double(), full_matrices=False).U
        left = "it uses the left-singular vectors (in R^r), not the right ones (in R^k)"
        hint = "A is r×k and reads inputs: its right-singular vectors span the input directions"
        mistakes.append((lambda: overlap(U1[:, :i], U2[:, :j]) / min(i, j), left, hint))
    return mistakes


def check_subspace_similarity(fn: Callable[[torch.Tensor, torch.Tensor, int, int], float]) -> CheckResult:
    """Check ``fn(A1, A2, i, j)``: Hu et al.'s φ = ‖U1^{iᵀ}U2^{j}‖_F² / min(i, j), with ``U^i`` the top-i
    right-singular vectors of ``A`` (``r×k``), as a number (a 0-d tensor is accepted), for random A of
    several ranks; the A are left unchanged. Left-singular vectors, Vh's columns, rows of A, no or
    the wrong normalisation and an unsquared norm are named."""
    result = CheckResult(_title("check_subspace_similarity", fn, "fn"))
    with _private_rng() as generator:
        for r1, r2, k, i, j in _CASES:
            A1, A2 = (torch.randn(r, k, generator=generator) for r in (r1, r2))
            before = (A1.clone(), A2.clone())
            call = f"fn(A1 {r1}×{k}, A2 {r2}×{k}, i={i}, j={j})"
            error, value = _attempt(fn, A1, A2, i, j)
            if error is not None:
                result.fail(f"{call} {error}", "A is r×k: its right-singular vectors live in R^k (rows of Vh)")
                return _printed(result)
            if not (torch.equal(A1, before[0]) and torch.equal(A2, before[1])):
                result.fail(f"{call} changed A1 or A2", "compute on the matrices; do not modify them in place")
                return _printed(result)
            value = _scalar(value)
            if not _is_number(value):
                result.fail(f"{call} returned {type(value).__name__}, not a number", "return φ as a float")
                return _printed(result)
            expected = subspace_similarity(A1, A2, i, j)
            if abs(value - expected) <= 1e-4:
                continue
            for wrong, problem, hint in _mistakes(A1, A2, i, j):
                try:
                    matches = abs(value - wrong()) <= 1e-4
                except RuntimeError:  # this mistake's shapes do not fit these ranks
                    matches = False
                if matches:
                    result.fail(f"{call} = {value:.4f}, expected {expected:.4f}: {problem}", hint)
                    return _printed(result)
            result.fail(
                f"{call} = {value:.4f}, expected φ = {expected:.4f}",
                "U^i: the top-i right-singular vectors of A; φ = ‖U1ᵀU2‖_F² / min(i, j)",
            )
            return _printed(result)
        r1, r2, k, i, j = _CASES[1]
        A1, A2 = (torch.randn(r, k, generator=generator) for r in (r1, r2))
        forward, (error, backward) = subspace_similarity(A1, A2, i, j), _attempt(fn, A2, A1, j, i)
        backward = _scalar(backward)
        if error is not None or not _is_number(backward) or abs(backward - forward) > 1e-4:
            result.fail(f"fn(A2, A1, j={j}, i={i}) gives {error or backward}, not φ(A1, A2, {i}, {j}) = {forward:.4f}",
                        "swap nothing by hand: the first matrix gives U^i, the second U^j")  # fmt: skip
            return _printed(result)
    result.ok(f"φ matches Hu et al.'s definition on {len(_CASES)} pairs of random A (ranks 3 to 8, i ≠ j included)")
    result.ok("φ(A1, A2, i, j) = φ(A2, A1, j, i), and the A are left unchanged")
    return _printed(result)


# --- notebook 06: rsLoRA ---------------------------------------------------------------------------


def check_rslora_prediction(predicted: object, measured: Experiment | Mapping[str, float]) -> CheckResult:
    """Check a prediction ``{"winner": label, "rank_gain": nats}`` about :data:`RSLORA_DEMO`'s runs: the run
    with the lowest target perplexity, and how far the rank-64 run under α/r ends below the rank-8 one,
    ``ln ppl(r=8) − ln ppl(r=64)`` in nats. ``measured``: each run's target perplexity by label (as
    :func:`measured_rslora` returns them), or an Experiment to measure. A winner within 0.05 nats of the
    best counts as right; the gain must be within max(0.15, half the measured gain) nats."""
    result = CheckResult("check_rslora_prediction")
    if isinstance(measured, Experiment):
        measured = measured_rslora(measured)
    labels = list(RSLORA_DEMO)
    if not isinstance(predicted, Mapping) or set(predicted) != {"winner", "rank_gain"}:
        got = sorted(map(str, predicted)) if isinstance(predicted, Mapping) else type(predicted).__name__
        result.fail(f"the prediction is {got}, expected a dict with the keys ['rank_gain', 'winner']",
                    '{"winner": one of the three labels, "rank_gain": a number of nats}')  # fmt: skip
        return _printed(result)
    loss = {label: math.log(float(measured[label])) for label in labels}
    best = min(loss.values())
    shown = ", ".join(f"{label}: {math.exp(value):.3f}" for label, value in loss.items())
    winner = predicted["winner"]
    if winner not in labels:
        result.fail(f"the predicted winner {winner!r} is not one of {labels}", "copy one of the three labels")
    elif loss[winner] - best <= _WINNER_TIE:
        result.ok(f"{winner} ends lowest (or within {_WINNER_TIE} nats of the lowest)")
    elif RSLORA_DEMO[winner][0] == 64 and not RSLORA_DEMO[winner][1]:
        result.fail(
            f"you predicted {winner} wins; measured target perplexities {shown}",
            "more directions are not faster learning: under α/r each of rank 64's directions is scaled 8× "
            "less than at rank 8, which cancels what the extra rank adds",
        )
    else:
        result.fail(
            f"you predicted {winner} wins; measured target perplexities {shown}",
            "with Adam the update grows with scaling·r·lr: compare that product for the three runs",
        )
    gain = predicted["rank_gain"]
    measured_gain = loss["r=8, alpha/r"] - loss["r=64, alpha/r"]
    tolerance = max(0.15, 0.5 * abs(measured_gain))
    if not _is_number(gain) or not math.isfinite(gain):
        result.fail(f"the predicted rank_gain {gain!r} is no finite number", "a number of nats, e.g. 0.5")
    elif abs(gain - measured_gain) <= tolerance:
        result.ok(f"rank 64's gain under α/r: predicted {gain:g} nats, measured {measured_gain:.3f}")
    elif gain > measured_gain:
        result.fail(
            f"you predicted rank 64 gains {gain:g} nats over rank 8 under α/r; measured {measured_gain:.3f}",
            "8× the parameters is not 8× the progress: α and lr are the same, so α·lr, which sets how fast "
            "the update grows across ranks, is the same too (notebook 05, §4.2)",
        )
    else:
        result.fail(
            f"you predicted rank 64 gains {gain:g} nats over rank 8 under α/r; measured {measured_gain:.3f}",
            "the extra rank is scaled down but not wasted: at the same α·lr the two grow about equally fast",
        )
    return _printed(result)
