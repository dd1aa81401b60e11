"""What the notebooks' hidden tests call: :func:`grade` runs one grader quietly and fails with its diagnosis.

A hidden test imports this module afresh (after removing ``lora_lab.checks`` from ``sys.modules``),
so a checker that a student rebound or patched in an unlocked cell is not the one that grades.
"""

from __future__ import annotations

import contextlib
import io

from . import (
    comparison,
    conv1d,
    finetuning,
    injection,
    lora_layer,
    lora_linear,
    low_rank,
    merging,
    models,
    training,
    variants,
)

__all__ = ["grade"]

_GRADERS = {
    "check_truncated_svd": low_rank.check_truncated_svd,
    "check_parameter_count": low_rank.check_parameter_count,
    "check_compression_ratio": low_rank.check_compression_ratio,
    "check_lora_layer": lora_layer.check_lora_layer,
    "check_lora_linear": lora_linear.check_lora_linear,
    "check_model_lora_count": models.check_model_lora_count,
    "check_apply_lora": injection.check_apply_lora,
    "check_merge_unmerge": merging.check_merge_unmerge,
    "check_lora_optimizer": finetuning.check_lora_optimizer,
    "check_merged_weight": finetuning.check_merged_weight,
    "check_dora_forward": variants.check_dora_forward,
    "check_nf4_quantize": variants.check_nf4_quantize,
    "check_conv1d_merge": conv1d.check_conv1d_merge,
    "check_forgetting_prediction": comparison.check_forgetting_prediction,
    "check_subspace_similarity": comparison.check_subspace_similarity,
    "check_rslora_prediction": comparison.check_rslora_prediction,
    "check_training_loop": training.check_training_loop,
    "check_perplexity": training.check_perplexity,
}


def grade(check: str, *args: object, **kwargs: object) -> None:
    """Run the grader named ``check`` on ``args``/``kwargs`` without printing its report; raise
    ``AssertionError`` carrying the diagnosis (what failed, each with its hint) when anything fails.

    Raises ``KeyError`` naming the known graders for an unknown ``check``.
    """
    if check not in _GRADERS:
        raise KeyError(f"no grader named {check!r}; known: {', '.join(sorted(_GRADERS))}")
    with contextlib.redirect_stdout(io.StringIO()):  # the visible test already printed the same report
        result = _GRADERS[check](*args, **kwargs)
    if not result:
        raise AssertionError(result.diagnosis())
