"""Checks a student runs on their own code in the notebooks' exercises.

Each ``check_*`` function calls the student's function or class on small, seeded examples and
PRINTS one line per property — ``ok`` or ``FAIL`` — and, for each failure, what it most likely
means and a hint. It returns a :class:`CheckResult`, which is truthy only when every property
holds, so a grading cell can ``assert result, result.diagnosis()`` (the diagnosis, what failed and
the hints, travels in the assertion message: ``nbgrader validate`` shows tracebacks, not what a
cell printed). A wrong answer
never raises: exceptions raised by the student's code are caught and reported as failures.

The checks draw their random numbers inside ``torch.random.fork_rng``, so calling one neither
depends on nor disturbs the notebook's own random state, and what they print is the same on
every run.

The layer graders hold the student to the paper's conventions (Hu et al. 2021) in PyTorch's
row layout, as PEFT writes them; :mod:`.lora_layer` spells them out.

The graders, by exercise:

- :mod:`.low_rank` (notebook 01): ``check_truncated_svd``, ``check_parameter_count``,
  ``check_compression_ratio``;
- :mod:`.lora_layer` and :mod:`.lora_linear` (notebook 02): ``check_lora_layer``,
  ``check_lora_linear``, on the checks of the two factors in :mod:`.factors`;
- :mod:`.models` (notebook 02): ``check_model_lora_count``;
- :mod:`.injection` and :mod:`.merging` (notebook 02): ``check_apply_lora``, ``check_merge_unmerge``;
- :mod:`.training` (notebook 03): ``check_training_loop``, ``check_perplexity``;
- :mod:`.finetuning` (notebook 04): ``check_lora_optimizer``, ``check_merged_weight``;
- :mod:`.comparison` (notebooks 05 and 06): ``check_forgetting_prediction``, ``check_subspace_similarity``,
  ``check_rslora_prediction``;
- :mod:`.conv1d` (notebook 08): ``check_conv1d_merge``;
- :mod:`.variants` (notebook 07): ``check_dora_forward``, ``check_nf4_quantize``;
- :mod:`.result`: :class:`CheckResult` and the seeded runner they all share.
"""

from .comparison import check_forgetting_prediction, check_rslora_prediction, check_subspace_similarity
from .conv1d import check_conv1d_merge
from .finetuning import check_lora_optimizer, check_merged_weight
from .injection import check_apply_lora
from .lora_layer import check_lora_layer
from .lora_linear import check_lora_linear
from .low_rank import check_compression_ratio, check_parameter_count, check_truncated_svd
from .merging import check_merge_unmerge
from .models import check_model_lora_count
from .result import CheckResult
from .training import check_perplexity, check_training_loop
from .variants import check_dora_forward, check_nf4_quantize

__all__ = [
    "CheckResult",
    "check_lora_layer",
    "check_lora_linear",
    "check_truncated_svd",
    "check_parameter_count",
    "check_compression_ratio",
    "check_model_lora_count",
    "check_apply_lora",
    "check_merge_unmerge",
    "check_conv1d_merge",
    "check_dora_forward",
    "check_nf4_quantize",
    "check_lora_optimizer",
    "check_merged_weight",
    "check_forgetting_prediction",
    "check_subspace_similarity",
    "check_rslora_prediction",
    "check_training_loop",
    "check_perplexity",
]
