"""Grader of notebook 02's counting exercise: what ``apply_lora_to_model`` will train in a model.

The student predicts the count from the base model alone, ``Σ r·(in + out)`` over its
``nn.Linear`` layers; lora_lab's own injection and count are the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..lora import apply_lora_to_model, count_parameters, lora_modules
from ..model import GPT, GPTConfig
from .result import CheckResult, _attempt, _is_number, _named_mistake, _run_check, _title


def _lora_count_models() -> list[tuple[str, nn.Module]]:
    nested = nn.Sequential(
        nn.Linear(10, 20), nn.ReLU(), nn.Sequential(nn.Linear(20, 20, bias=False), nn.GELU(), nn.Linear(20, 5))
    )
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    return [("a nested nn.Sequential MLP", nested), ("a 2-layer GPT", gpt)]


def check_model_lora_count(fn: Callable[[nn.Module, int], int]) -> CheckResult:
    """Check ``fn(model, rank)``: the number of parameters ``apply_lora_to_model(model, rank)``
    will train, predicted from the base model without adapting it — ``Σ r·(in + out)`` over its
    ``nn.Linear`` layers. Compared with lora_lab's count on a nested MLP and a small GPT; counting
    every parameter, full ``in·out`` matrices, biases, or only the top-level children is named,
    and so is changing the model."""
    return _run_check(_title("check_model_lora_count", fn, "fn"), _check_lora_counts, fn)


def _check_lora_counts(result: CheckResult, fn: Callable[[nn.Module, int], int], _generator: torch.Generator) -> None:
    # No tensors of its own: the models, the student's fn and apply_lora_to_model's fresh adapters
    # draw from the global generator, which _run_check seeds and restores.
    for label, model in _lora_count_models():
        if not _check_model_count(result, fn, label, model):
            return


def _check_model_count(result: CheckResult, fn: Callable[[nn.Module, int], int], label: str, model: nn.Module) -> bool:
    """Check ``fn`` on one model for r = 1 and 4, then that it left the model as it was; False
    after a wrong count, which ends the check."""
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for rank in (1, 4):
        error, got = _attempt(fn, model, rank)
        if error is not None:
            result.fail(
                f"fn({label}, {rank}) {error}",
                "loop over model.modules(), keep the nn.Linear ones, add rank·(in + out) for each",
            )
            return False
        expected = count_parameters(apply_lora_to_model(model, rank=rank))[0]
        if _is_number(got) and got == expected:
            continue
        mistakes = {
            sum(p.numel() for p in model.parameters()): "that is every parameter of the model",
            sum(m.in_features * m.out_features for m in linears): "that counts the full in·out weights",
            rank * sum(m.in_features * m.out_features for m in linears): "that counts r·in·out per layer",
            expected + sum(m.bias.numel() for m in linears if m.bias is not None): "that adds the biases; "
            "apply_lora_to_model freezes them",
            rank
            * sum(
                m.in_features + m.out_features for m in model.children() if isinstance(m, nn.Linear)
            ): "that counts only the top-level nn.Linear children; nested layers count too (use .modules())",
        }
        result.fail(
            f"fn({label}, rank={rank}) = {got!r}, expected {expected}"
            f"{_named_mistake(got, mistakes, f'returned a {type(got).__name__}')}",
            "sum rank * (m.in_features + m.out_features) over every nn.Linear in model.modules()",
        )
        return False
    changed = (
        [p.requires_grad for p in model.parameters()] != flags
        or lora_modules(model)
        or model.state_dict().keys() != state.keys()
        or any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    )
    if changed:
        result.fail(
            f"fn changed {label} (its weights, requires_grad flags or layers)",
            "only read the model: the count follows from the nn.Linear shapes",
        )
    else:
        result.ok(f"{label}: matches count_parameters(apply_lora_to_model(model, r))[0] for r = 1 and 4")
    return True
