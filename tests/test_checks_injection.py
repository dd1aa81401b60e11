"""Notebook 02's graders of ``apply_lora_to_model`` and of merge/unmerge: the reference solutions pass, each
typical mistake fails with its diagnosis, and neither the student's code nor the check disturbs what it must not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_lab
from lora_lab.checks import check_apply_lora, check_merge_unmerge
from lora_lab.checks.grading import grade

LoRALinear = lora_lab.LoRALinear  # the name the student's functions below build their wrappers by


def _only_factors_train(model):
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(("lora_A", "lora_B"))
    return model


def apply_right(model, rank=4, alpha=1.0):
    model = copy.deepcopy(model)
    _wrap(model, rank, alpha)
    return _only_factors_train(model)


def _wrap(module, rank, alpha):
    for name, child in module.named_children():
        if isinstance(child, LoRALinear):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank=rank, alpha=alpha))
        else:
            _wrap(child, rank, alpha)


def apply_by_names(model, rank=4, alpha=1.0):
    """Another right answer: by named_modules, refusing a model that is already adapted."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("already adapted")
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(m, rank, alpha))
    lora_lab.mark_only_lora_as_trainable(model)
    return model


def apply_no_copy(model, rank=4, alpha=1.0):
    _wrap(model, rank, alpha)
    return _only_factors_train(model)


def apply_shallow_copy(model, rank=4, alpha=1.0):
    return apply_no_copy(copy.copy(model), rank, alpha)


def apply_top_level(model, rank=4, alpha=1.0):
    model = copy.deepcopy(model)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, LoRALinear(child, rank=rank, alpha=alpha))
    return _only_factors_train(model)


def apply_seed(model, rank=4, alpha=1.0):
    """The seed's recursion: right on a base model, but it wraps an adapter's inner layer when applied again."""
    model = copy.deepcopy(model)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, LoRALinear(child, rank=rank, alpha=alpha))
        else:
            setattr(model, name, apply_seed(child, rank=rank, alpha=alpha))
    return _only_factors_train(model)


def apply_recursing_after_replacing(model, rank=4, alpha=1.0):
    return _only_factors_train(_replace_then_recurse(copy.deepcopy(model), rank, alpha))


def _replace_then_recurse(module, rank, alpha):
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank=rank, alpha=alpha))
    for child in module.children():  # now includes the new wrappers: their original_layer gets wrapped too
        _replace_then_recurse(child, rank, alpha)
    return module


def apply_no_freeze(model, rank=4, alpha=1.0):
    model = copy.deepcopy(model)
    _wrap(model, rank, alpha)
    return model


def apply_returns_none(model, rank=4, alpha=1.0):
    apply_right(model, rank, alpha)


def apply_default_rank(model, rank=4, alpha=1.0):
    model = copy.deepcopy(model)
    _wrap(model, 4, 1.0)
    lora_lab.mark_only_lora_as_trainable(model)
    return model


def apply_stub(model, rank=4, alpha=1.0):
    raise NotImplementedError()


APPLY_MISTAKES = {
    "no deepcopy": (apply_no_copy, "returned the model it was given"),
    "shallow copy": (apply_shallow_copy, "copy.deepcopy(model)"),
    "no recursion": (apply_top_level, "recurse into every child"),
    "recursing after replacing": (apply_recursing_after_replacing, "adapters on adapters"),
    "the seed's recursion, applied again": (apply_seed, "skip modules that are already"),
    "no freeze": (apply_no_freeze, "the course's slip"),
    "returns None": (apply_returns_none, "fn returned None"),
    "rank not passed on": (apply_default_rank, "pass rank and alpha on"),
    "not written": (apply_stub, "replace `raise NotImplementedError()`"),
}


@pytest.mark.parametrize("fn", [apply_right, apply_by_names])
def test_apply_right_answers_pass(fn, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.random.get_rng_state()
    result = check_apply_lora(fn)
    assert result, result.diagnosis()
    assert len(result.passed) == 5
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "All 5 passed." in capsys.readouterr().out
    grade("check_apply_lora", fn)


@pytest.mark.parametrize("case", list(APPLY_MISTAKES))
def test_apply_each_mistake_is_named(case: str) -> None:
    fn, diagnosis = APPLY_MISTAKES[case]
    result = check_apply_lora(fn)
    assert not result
    assert any(diagnosis in problem + " " + hint for problem, hint in result.failed), result.diagnosis()
    with pytest.raises(AssertionError, match="check_apply_lora"):
        grade("check_apply_lora", fn)


def apply_by_the_library(model, rank=4, alpha=1.0):
    return lora_lab.apply_lora_to_model(model, rank=rank, alpha=alpha)


def test_calling_the_library_is_not_the_exercise() -> None:
    assert check_apply_lora(apply_by_the_library)  # without layer_class: any wrapper with the course's attributes
    result = check_apply_lora(apply_by_the_library, layer_class=lora_lab.LoRALinear)
    assert not result and "FusedLoRALinear" in result.failed[0][0] and "skips the exercise" in result.failed[0][1]


def test_layer_class_grades_on_the_reference_wrapper_and_restores_the_name() -> None:
    global LoRALinear

    class Broken(nn.Module):  # a student's wrong wrapper: no adapter at all
        def __init__(self, layer, rank=4, alpha=1.0):
            super().__init__()
            self.layer = layer

    LoRALinear = Broken
    try:
        assert not check_apply_lora(apply_right)
        assert check_apply_lora(apply_right, layer_class=lora_lab.LoRALinear)
        assert LoRALinear is Broken  # the binding is put back after the check
    finally:
        LoRALinear = lora_lab.LoRALinear


def merge_right(layer):
    with torch.no_grad():
        saved = layer.original_layer.weight.clone()
        layer.original_layer.weight += layer.lora.scaling * (layer.lora.lora_B @ layer.lora.lora_A)
    layer.merged = True
    return saved


def unmerge_right(layer, saved):
    with torch.no_grad():
        layer.original_layer.weight.copy_(saved)
    layer.merged = False


def merge_new_parameter(layer):
    """Another right answer: a new frozen Parameter, as lora_lab's merge does."""
    saved = layer.original_layer.weight.detach().clone()
    merged = saved + layer.lora.delta_weight().detach()
    layer.original_layer.weight = nn.Parameter(merged, requires_grad=False)
    layer.merged = True
    return saved


def unmerge_new_parameter(layer, saved):
    layer.original_layer.weight = nn.Parameter(saved.clone(), requires_grad=False)
    layer.merged = False


def merge_unscaled(layer):
    with torch.no_grad():
        saved = layer.original_layer.weight.clone()
        layer.original_layer.weight += layer.lora.lora_B @ layer.lora.lora_A
    layer.merged = True
    return saved


def merge_no_flag(layer):
    with torch.no_grad():
        saved = layer.original_layer.weight.clone()
        layer.original_layer.weight += layer.lora.scaling * (layer.lora.lora_B @ layer.lora.lora_A)
    return saved


def merge_alias(layer):
    with torch.no_grad():
        saved = layer.original_layer.weight  # not a copy
        layer.original_layer.weight += layer.lora.scaling * (layer.lora.lora_B @ layer.lora.lora_A)
    layer.merged = True
    return saved


def merge_trainable(layer):
    saved = layer.original_layer.weight.detach().clone()
    layer.original_layer.weight = nn.Parameter(saved + layer.lora.delta_weight().detach())
    layer.merged = True
    return saved


def merge_zeroing_b(layer):
    saved = merge_right(layer)
    with torch.no_grad():
        layer.lora.lora_B.zero_()
    return saved


def merge_transposed(layer):
    with torch.no_grad():
        saved = layer.original_layer.weight.clone()
        layer.original_layer.weight += layer.lora.scaling * (layer.lora.lora_A.T @ layer.lora.lora_B.T)
    layer.merged = True
    return saved


def unmerge_subtracting(layer, saved):
    with torch.no_grad():
        layer.original_layer.weight -= layer.lora.scaling * (layer.lora.lora_B @ layer.lora.lora_A)
    layer.merged = False


def unmerge_no_flag(layer, saved):
    with torch.no_grad():
        layer.original_layer.weight.copy_(saved)


def merge_stub(layer):
    raise NotImplementedError()


MERGE_MISTAKES = {
    "no scaling": (merge_unscaled, unmerge_right, "without α/r"),
    "merged flag not set": (merge_no_flag, unmerge_right, "counted twice"),
    "returns the weight itself": (merge_alias, unmerge_right, "returned the weight itself"),
    "weight made trainable": (merge_trainable, unmerge_right, "became trainable"),
    "B zeroed": (merge_zeroing_b, unmerge_right, "changed lora_A or lora_B"),
    "transposed": (merge_transposed, unmerge_right, "(out × r)(r × in)"),
    "unmerge subtracts": (merge_right, unmerge_subtracting, "not give W bit for bit"),
    "unmerge keeps the flag": (merge_right, unmerge_no_flag, "layer.merged is still True"),
    "not written": (merge_stub, unmerge_right, "replace `raise NotImplementedError()`"),
}


RIGHT_MERGES = [(merge_right, unmerge_right), (merge_new_parameter, unmerge_new_parameter)]


@pytest.mark.parametrize(("merge", "unmerge"), RIGHT_MERGES)
def test_merge_right_answers_pass(merge, unmerge, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.random.get_rng_state()
    result = check_merge_unmerge(merge, unmerge)
    assert result, result.diagnosis()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "All 2 passed." in capsys.readouterr().out
    grade("check_merge_unmerge", merge, unmerge)


@pytest.mark.parametrize("case", list(MERGE_MISTAKES))
def test_merge_each_mistake_is_named(case: str) -> None:
    merge, unmerge, diagnosis = MERGE_MISTAKES[case]
    result = check_merge_unmerge(merge, unmerge)
    assert not result
    problem, hint = result.failed[0]
    assert diagnosis in problem + " " + hint, result.diagnosis()


def test_subtracting_really_drifts() -> None:
    """The premise of the exercise: on the grader's layers (W + ΔW) − ΔW is not W bit for bit."""
    result = check_merge_unmerge(merge_right, unmerge_subtracting)
    assert not result and "off by up to" in result.failed[0][0]
