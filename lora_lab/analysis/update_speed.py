"""How fast does a LoRA update grow? ‖ΔW x‖ measured after a few steps, for several r, α and lr.

With Adam each entry of A and B moves by about the learning rate per step whatever the gradient's
scale, and B starts at zero. After k steps ``B ≈ k·lr·U`` and ``ΔW x = (α/r)·B·A x``, so at a fixed
rank, to first order, the update's size goes with ``(α/r)·lr``: α and lr trade one for one. Across
ranks the r columns of B grow together, each in the direction that lowers the loss, and their
contributions add up: ``‖B A x‖`` grows about like r, so the size goes with ``(α/r)·lr·r = α·lr``.
That is why Hu et al. keep α fixed when they vary r, and why the course's r=4, α=1 (scaling 0.25)
moves slowly. The first-order picture holds while A stays near its random start: A also moves by
about lr per entry and step, so once ``k·lr`` is no longer small next to A's entries (about
``1/√d_in``) a larger lr goes further than a larger α with the same product. The measurement shows
how far each statement holds at a given number of steps.

:func:`update_growth` checks this by measurement rather than by formula: it trains each setting for
``steps`` steps at a constant learning rate from the same base, the same batches and (per rank)
the same random A, and measures the adapters' output ``ΔW x`` on held-out text.
:data:`GROWTH_GRID` holds three groups of settings that make the two statements testable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import steps_per_epoch
from ..experiment.stages import Experiment, TrainedModel
from ..lora import apply_lora_to_model, lora_modules
from ..seeding import seed_everything
from ..training import TrainConfig, train
from ..validation import check_positive_int, check_positive_real

__all__ = ["GrowthSetting", "GROWTH_GRID", "update_growth", "growth_table"]


@dataclass(frozen=True)
class GrowthSetting:
    """One LoRA setting to measure: its group (which statement it tests), rank, α and lr."""

    group: str
    rank: int
    alpha: float
    lr: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_positive_real("alpha", self.alpha)
        check_positive_real("lr", self.lr)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


#: Three groups of settings. ``fixed r, equal (α/r)·lr``: one rank, α and lr traded one for one —
#: to first order the sizes agree (a larger lr also moves A: see the module's docstring). ``ranks,
#: equal α·lr``: α and lr fixed as r grows 16× — they should stay close. ``ranks, equal (α/r)·lr``:
#: α = 2r as r grows — the size should grow with r.
GROWTH_GRID: tuple[GrowthSetting, ...] = (
    *(GrowthSetting("fixed r, equal (α/r)·lr", 16, a, lr) for a, lr in ((8.0, 4e-3), (32.0, 1e-3), (128.0, 2.5e-4))),
    *(GrowthSetting("ranks, equal α·lr", r, 32.0, 1e-3) for r in (4, 16, 64)),
    *(GrowthSetting("ranks, equal (α/r)·lr", r, 2.0 * r, 1e-3) for r in (4, 16, 64)),
)


@torch.no_grad()
def _adapter_output_norms(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
    """Mean over adapted layers of the RMS over tokens of ``‖ΔW x‖`` and of ``‖W x‖``."""
    delta, frozen, hooks = [], [], []

    def record(module, inputs, _output) -> None:
        x = inputs[0]
        delta.append(module.lora(x).norm(dim=-1).pow(2).mean().sqrt().item())
        frozen.append((x @ module.weight.t()).norm(dim=-1).pow(2).mean().sqrt().item())

    for module in lora_modules(model).values():
        hooks.append(module.register_forward_hook(record))
    try:
        model.eval()
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(delta) / len(delta), sum(frozen) / len(frozen)


def update_growth(
    exp: Experiment,
    base: TrainedModel,
    settings: Sequence[GrowthSetting] = GROWTH_GRID,
    *,
    steps: int = 10,
    windows: int = 16,
) -> list[dict]:
    """Train a LoRA copy of ``base`` (every linear layer) for ``steps`` steps at a constant
    learning rate per setting and measure its update on (up to) ``windows`` held-out target windows.

    Every run starts from the same seed: the same batches and, at one rank, the same A. Returns
    one dict per setting: ``group, rank, alpha, lr, scaling, scaled_lr`` ((α/r)·lr, the scaling
    times lr), ``alpha_lr`` (α·lr), ``delta_norm`` (‖ΔW x‖, RMS over tokens, mean over layers)
    and ``relative`` (that over ‖W x‖). Nothing is cached: each run takes a few steps."""
    steps = check_positive_int("steps", steps)
    windows = check_positive_int("windows", windows)
    if not settings:
        raise ValueError("update_growth needs at least one setting")
    block = exp.profile.model.block_size
    data = exp.splits.target_val
    windows = min(windows, len(data) // block)  # as many as the split holds, up to ``windows``
    if windows < 1:
        raise ValueError(f"the target validation split ({len(data)} tokens) holds no window of {block}")
    tokens = data[: windows * block].view(windows, block).to(exp.device)
    per_epoch = steps_per_epoch(len(exp.splits.target_train), block, exp.profile.batch_size)
    runs = []
    for setting in settings:
        # Constant lr (no warm-up, no decay): the update after k steps then measures the step size alone.
        config = TrainConfig(steps / per_epoch, setting.lr, exp.profile.batch_size, warmup_fraction=0.0,
                             min_lr_fraction=1.0, seed=exp.profile.seed + 1)  # fmt: skip
        seed_everything(config.seed)
        model = apply_lora_to_model(base.model, rank=setting.rank, alpha=setting.alpha, use_rslora=setting.use_rslora)
        desc = f"r={setting.rank} α={setting.alpha:g} lr={setting.lr:g}"
        history = train(model, exp.splits.target_train, None, config, block_size=block, device=exp.device, desc=desc,
                        progress=exp.progress)  # fmt: skip
        if history.steps != steps:
            raise RuntimeError(f"update_growth trained {history.steps} steps instead of {steps}")
        delta, frozen = _adapter_output_norms(model, tokens)
        runs.append({
            "group": setting.group, "rank": setting.rank, "alpha": setting.alpha, "lr": setting.lr,
            "scaling": setting.scaling, "scaled_lr": setting.scaling * setting.lr,
            "alpha_lr": setting.alpha * setting.lr, "delta_norm": delta, "relative": delta / frozen,
        })  # fmt: skip
        del model
    return runs


def growth_table(runs: Sequence[dict]) -> str:
    """:func:`update_growth`'s runs as a Markdown table, with each run's size relative to the
    first run of its group."""
    lines = ["| group | r | α | lr | (α/r)·lr | α·lr | ‖ΔW x‖ | ‖ΔW x‖/‖W x‖ | × group's first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    first: dict[str, float] = {}
    for run in runs:
        reference = first.setdefault(run["group"], run["delta_norm"])
        lines.append(
            f"| {run['group']} | {run['rank']} | {run['alpha']:g} | {run['lr']:g} | {run['scaled_lr']:.3g} | "
            f"{run['alpha_lr']:.3g} | {run['delta_norm']:.4f} | {run['relative']:.4f} | "
            f"{run['delta_norm'] / reference:.2f} |"
        )
    return "\n".join(lines)
