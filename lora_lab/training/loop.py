"""One training loop for pretraining, LoRA and full fine-tuning.

What is trained is decided by the model itself: the optimiser receives exactly the parameters
with ``requires_grad=True``. After :func:`lora_lab.apply_lora_to_model` those are the adapters'
A and B; for pretraining and full fine-tuning, everything.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import iterate_batches, total_steps
from . import distributed
from .compute import ComputeSettings, ResolvedCompute, make_adamw, to_device
from .metrics import mean_loss

__all__ = ["TrainConfig", "TrainHistory", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (plain data, stored with the results)."""

    epochs: float
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05  # linear warm-up: AdamW's first steps are noisy at full lr
    min_lr_fraction: float = 0.1  # cosine decay down to 10% of lr
    grad_clip: float = 1.0
    eval_points: int = 10  # validate every steps // eval_points steps and after the last (plus once at the start)
    eval_max_windows: int = 64  # windows per validation estimate during training
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size!r}")


@dataclass
class TrainHistory:
    """Loss history of a run: ``train_loss[i]`` is the loss of step ``i``; ``val_loss`` is a
    list of ``(step, loss)``; ``seconds`` is wall-clock training time (validation excluded)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0

    def to_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "seconds": self.seconds, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> TrainHistory:
        return cls(
            [float(x) for x in data["train_loss"]],
            [(int(s), float(v)) for s, v in data["val_loss"]],
            float(data["seconds"]),
            int(data["steps"]),
        )


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    warmup = max(1, int(config.warmup_fraction * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.min_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor | None,
    config: TrainConfig,
    *,
    block_size: int,
    device: torch.device | str = "cpu",
    desc: str = "training",
    progress: bool = True,
    restore_on_error: bool = True,
    keep_best: bool = False,
    compute: ComputeSettings | None = None,
    param_groups: list[dict] | None = None,
) -> TrainHistory:
    """Train ``model`` (its parameters with ``requires_grad``) with AdamW on next-token
    prediction over ``train_data``, validating on ``val_data`` at the start, every
    ``steps // config.eval_points`` steps and after the last step.

    ``model(x, y)`` must return ``(logits, loss)`` (as :class:`lora_lab.model.GPT` does).
    A non-finite loss stops training with an error naming the step. On that error, and on any
    other (out of memory, a keyboard interrupt), the model is left as it was given: its
    parameters restored, on its original device, in its original train/eval mode. Restoring
    needs a copy of the trainable parameters, for full fine-tuning a second copy of the model:
    a caller that trains a throwaway copy (as :mod:`lora_lab.experiment.stages` does) passes
    ``restore_on_error=False`` and discards the model instead.

    With ``keep_best=True`` (early stopping by checkpoint) the model ends with the trainable
    parameters it had at the validation point of lowest validation loss, the start included, so
    a run that over-fits, or never improves, is judged by its best point rather than its last
    step. That point is the argmin of the history's ``val_loss``; the history still records every
    step. It needs ``val_data``.

    ``compute`` chooses bf16 autocast and ``torch.compile`` (:mod:`~lora_lab.training.compute`;
    default: fp32 on a CPU, bf16 on a GPU that has it). Under ``torchrun`` (an open process group)
    the step runs under ``DistributedDataParallel``, each rank on its share of every batch
    (:mod:`~lora_lab.training.distributed`); validation then runs on rank 0 only, so
    ``keep_best`` is refused there.

    ``param_groups`` replaces the optimiser's default groups (matrices decayed by
    ``config.weight_decay``, the rest not): a list of ``{"params", "lr", "weight_decay"}`` dicts
    covering the trainable parameters once each, as :func:`lora_lab.lora.loraplus.loraplus_param_groups`
    builds them. A group's ``lr`` is its peak: the schedule scales each group by ``lr / config.lr``.
    """
    if keep_best and val_data is None:
        raise ValueError("keep_best keeps the checkpoint of lowest validation loss, so it needs val_data")
    if keep_best and distributed.current().active:
        raise ValueError("keep_best needs the validation loss on every process, and under torchrun only rank 0 "
                         "validates; run with keep_best in one process (without torchrun)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (every requires_grad is False); nothing to train")
    device = torch.device(device)
    resolved = (compute or ComputeSettings()).resolve(device)  # an impossible option fails before anything moves
    given_device, given_mode = params[0].device, model.training
    # Kept so that a failed run leaves the model exactly as it was given.
    if param_groups is not None:
        _check_groups(param_groups, params)
    snapshot = [p.detach().clone() for p in params] if restore_on_error else None
    try:
        return _train(
            model, params, train_data, val_data, config, block_size, device, desc, progress, resolved, keep_best,
            param_groups,
        )
    except BaseException:
        if snapshot is None:
            raise
        model.to(given_device)
        with torch.no_grad():
            for param, saved in zip(params, snapshot):
                param.copy_(saved)
        model.train(given_mode)
        raise


def _check_groups(groups: list[dict], params: list[nn.Parameter]) -> None:
    grouped = [p for group in groups for p in group.get("params", [])]
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise ValueError(
            f"param_groups must hold each trainable parameter exactly once; they hold {len(grouped)} entries for "
            f"the model's {len(params)} trainable parameters"
        )
    for group in groups:
        lr = group.get("lr")
        if lr is not None and not (isinstance(lr, float | int) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"a param group's lr must be a positive number, got {lr!r}")


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    train_data: torch.Tensor,
    val_data: torch.Tensor | None,
    config: TrainConfig,
    block_size: int,
    device: torch.device,
    desc: str,
    progress: bool,
    compute: ResolvedCompute,
    keep_best: bool = False,
    param_groups: list[dict] | None = None,
) -> TrainHistory:
    model.to(device)
    world = distributed.current()
    world.seed_dropout(config.seed)
    # The model the step calls: DDP around the model (it shares its parameters), then compiled.
    step_model = compute.compiled(world.wrap(model, device))
    if param_groups is None:
        # Decay matrices only (as nanoGPT does): biases and LayerNorm gains are not decayed.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:  # each group follows the schedule at its own peak lr (LoRA+: B's is λ times A's)
        groups = [{**group, "lr_ratio": group.get("lr", config.lr) / config.lr} for group in param_groups]
    optimizer = make_adamw(groups, config.lr, device)
    steps = total_steps(len(train_data), block_size, config.batch_size, config.epochs)
    eval_every = max(1, steps // max(1, config.eval_points))
    result = TrainHistory(steps=steps)

    best: list = []  # with keep_best: [loss, copies of the trainable parameters] at the best point so far

    def validate(step: int) -> None:
        if val_data is not None and world.is_main:
            loss = mean_loss(model, val_data, block_size, device=device, max_windows=config.eval_max_windows)
            result.val_loss.append((step, loss))
            if keep_best and (not best or loss < best[0]):
                best[:] = [loss, [p.detach().clone() for p in params]]

    validate(0)
    model.train()
    start = time.perf_counter()
    batches = iterate_batches(train_data, block_size, config.batch_size, config.epochs, config.seed)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:  # closed on errors too
        for step, (x, y) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, config)
                if "lr_ratio" in group:
                    group["lr"] *= group["lr_ratio"]
            x, y, weight = world.shard(x, y)
            with compute.autocast():
                _, loss = step_model(to_device(x, device), to_device(y, device))
            value = world.global_mean(loss, weight)
            if world.active:  # DDP averages the ranks' gradients: weighted, that is the global batch's
                loss = loss * weight
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{desc}: the loss became {value} at step {step + 1} of {steps} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); "
                    "the learning rate is most likely too high for this model — lower it (e.g. by 3-10×) and rerun"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            result.train_loss.append(value)
            bar.update(1)
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                result.seconds += time.perf_counter() - start
                validate(step + 1)
                bar.set_postfix(loss=f"{value:.3f}", val=f"{result.val_loss[-1][1]:.3f}" if result.val_loss else "-")
                model.train()
                start = time.perf_counter()
        result.seconds += time.perf_counter() - start
    if keep_best:
        with torch.no_grad():
            for param, saved in zip(params, best[1]):
                param.copy_(saved)
    model.eval()
    return result
