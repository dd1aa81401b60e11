"""LoRA's variants measured side by side: ``lora-lab variants`` and notebook 07.

From the main job's pretrained base and with the tuned recipe's rank, α and targets (r=16, α=32,
every ``nn.Linear``), each variant fine-tunes on the target part with the same step budget:

========== ==========================================================================
lora       the tuned recipe (the main job's ``lora``)
rslora     the same with rsLoRA's scaling α/√r (8 instead of 2)
dora       DoRA (:mod:`lora_lab.lora.dora`)
pissa      PiSSA's initialisation (:mod:`lora_lab.lora.pissa`)
loraplus   LoRA+ with λ = 16, PEFT's suggested ratio (:mod:`lora_lab.lora.loraplus`); the lr is A's
qlora      LoRA on a 4-bit NF4 frozen base (:mod:`lora_lab.lora.nf4`)
full       full fine-tuning
========== ==========================================================================

The learning rate of each is chosen by one protocol: three values a factor 3 apart around the
variant's usual one, each trained once (the first seed) with the full budget; the lowest final
validation loss wins (a diverged run loses). The other seeds then train at that rate; the first
seed's run is the sweep's own (the cache knows it). Selection and the reported perplexity use the
same held-out target split (the training loop's estimate over 64 windows for the selection, the
whole split for the table): a small optimistic bias, the same for every variant.

Each trained model is cached like the main job's (keyed by the base, the variant, the lr, the
seed and the budget), so a rerun or the notebook reuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_write_text, json_text
from ..lora import apply_lora_to_model, count_parameters, load_adapter, loraplus_param_groups, save_adapter
from ..lora.nf4 import frozen_bytes, quantize_base
from ..model import GPT, load_checkpoint, save_checkpoint
from ..runtime import machine_description
from ..seeding import seed_everything
from ..training import TrainHistory
from .config import TUNED_RECIPE, LoRARecipe
from .seeds import Spread
from .stages import Experiment, TrainedModel, _base_key, _cached_stage, _key, _train, entropy_floors, evaluate

__all__ = [
    "Variant", "VARIANTS", "VariantRun", "VariantSummary", "VariantsResults", "variant_finetuned", "run_variants",
    "step_time_ratios", "write_variants",
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One way to fine-tune, and the learning rates its sweep tries (lr of A for LoRA+)."""

    name: str
    label: str
    lr_grid: tuple[float, ...]
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    loraplus_ratio: float | None = None
    nf4: bool = False
    full: bool = False

    def settings(self) -> dict:
        """What decides the trained model (the cache key's part): everything but the label and the grid."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("label", "lr_grid")}


VARIANTS: tuple[Variant, ...] = (
    Variant("lora", "LoRA", (3e-3, 1e-2, 3e-2)),
    Variant("rslora", "rsLoRA", (1e-3, 3e-3, 1e-2), use_rslora=True),
    Variant("dora", "DoRA", (3e-3, 1e-2, 3e-2), use_dora=True),
    Variant("pissa", "PiSSA", (1e-3, 3e-3, 1e-2), init="pissa"),
    Variant("loraplus", "LoRA+ (λ=16)", (3e-4, 1e-3, 3e-3), loraplus_ratio=16.0),
    Variant("qlora", "4-bit base + LoRA", (3e-3, 1e-2, 3e-2), nf4=True),
    Variant("full", "full fine-tuning", (7e-4, 2e-3, 6e-3), full=True),
)


def _variant(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(v.name for v in VARIANTS)}")


def _untrained(base: GPT, variant: Variant, recipe: LoRARecipe) -> nn.Module:
    """The model a variant starts from: a copy of ``base`` (never ``base`` itself)."""
    if variant.full:
        model = copy.deepcopy(base)
        for param in model.parameters():
            param.requires_grad = True
        return model
    model = apply_lora_to_model(
        base, rank=recipe.rank, alpha=recipe.alpha, use_rslora=variant.use_rslora, use_dora=variant.use_dora,
        target_modules=list(recipe.target_modules) if recipe.target_modules else None, init=variant.init,
        fused=not variant.nf4,  # the fused path reads W as one float tensor
    )  # fmt: skip
    return quantize_base(model) if variant.nf4 else model


def _param_groups(model: nn.Module, variant: Variant, lr: float) -> list[dict] | None:
    return None if variant.loraplus_ratio is None else loraplus_param_groups(model, lr, variant.loraplus_ratio)


def variant_finetuned(
    exp: Experiment, base: TrainedModel[GPT], variant: Variant | str, lr: float, *, seed: int = 0,
    epochs: float | None = None,
) -> TrainedModel[nn.Module]:  # fmt: skip
    """``base`` fine-tuned on the target part by ``variant`` at ``lr``; ``seed`` counts from the main
    job's fine-tuning seed (0: the same A init and batch order as the main job's)."""
    variant = _variant(variant) if isinstance(variant, str) else variant
    recipe = exp.profile.recipe(TUNED_RECIPE)
    config = dataclasses.replace(exp.profile.finetune_config(lr, epochs), seed=exp.profile.seed + 1 + seed)
    shape = {"rank": recipe.rank, "alpha": recipe.alpha, "targets": recipe.target_modules}
    key = _key(stage="variant", base=_base_key(exp), variant=variant.settings(), shape=shape, train=config.__dict__)
    seed_everything(config.seed)  # A's random init comes from the global generator
    model = _untrained(base.model, variant, recipe)
    trainable = count_parameters(model)[0]
    weights = "model.safetensors" if variant.full else "adapter/adapter_model.safetensors"

    def build(work: Path) -> TrainHistory:
        history = _train(exp, model, "target", config, variant.name, restore_on_error=False,
                         param_groups=_param_groups(model, variant, lr))  # fmt: skip
        if variant.full:
            save_checkpoint(model, work / weights)
        else:
            save_adapter(model, work / "adapter")
        return history

    def load(folder: Path, built: bool) -> tuple[nn.Module, Path]:
        if not built and variant.full:
            return load_checkpoint(folder / weights, device=exp.device), folder / weights
        if not built:
            load_adapter(model, folder / "adapter")
        return model, folder / weights

    model, history, artifact = _cached_stage(exp, "variant", key, build, load)
    return TrainedModel(variant.name, model.eval(), history, artifact, trainable)


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantRun:
    """One trained model: its seed, learning rate and measurements."""

    seed: int
    lr: float
    target_ppl: float
    source_ppl: float
    valid_rate: float | None
    steps: int
    train_seconds: float


@dataclass(frozen=True)
class VariantSummary:
    """A variant over its seeds, with its sweep (lr, final validation loss or None if diverged)."""

    name: str
    label: str
    lr: float
    sweep: list[tuple[float, float | None]]
    runs: list[VariantRun]
    trainable_params: int
    frozen_bytes: int
    step_time_ratio: list[float] = field(default_factory=list)  # [median, 25th, 75th percentile] vs LoRA

    def _values(self, metric: str) -> list[float]:
        return [getattr(run, metric) for run in self.runs if getattr(run, metric) is not None]

    def seed_spread(self, metric: str) -> Spread:
        """``metric`` over the seeds, as results.json's tables read it (:class:`~lora_lab.experiment.seeds.Spread`)."""
        return Spread.of(self._values(metric))

    def mean(self, metric: str) -> float:
        return self.seed_spread(metric).mean


@dataclass
class VariantsResults:
    """What ``lora-lab variants`` writes (``paper/variants.json``) and notebook 07 reads."""

    profile: str
    epochs: float
    seeds: int
    floors: dict[str, float]
    machine: str
    variants: list[VariantSummary]

    def variant(self, name: str) -> VariantSummary:
        return next(v for v in self.variants if v.name == name)

    def nats_to_floor(self, name: str) -> float:
        """ln(mean target ppl) − ln(floor): the excess cross-entropy per character, in nats."""
        return math.log(self.variant(name).mean("target_ppl")) - math.log(self.floors["target"])

    def to_json(self) -> str:
        return json_text(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str = "variants.json") -> VariantsResults:
        import json

        try:
            data = json.loads(text)
            variants = [
                VariantSummary(**{**v, "sweep": [tuple(s) for s in v["sweep"]],
                                  "runs": [VariantRun(**run) for run in v["runs"]]})
                for v in data.pop("variants")
            ]  # fmt: skip
            results = cls(**data, variants=variants)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{where} is not a variants table written by lora-lab variants ({error})") from None
        if not all(v.runs for v in results.variants):
            raise ValueError(f"{where}: a variant has no runs")
        return results


def write_variants(results: VariantsResults, path: str | Path) -> Path:
    """Write the table atomically (a reader never sees half of it)."""
    atomic_write_text(path, results.to_json())
    return Path(path)


# --- the job -------------------------------------------------------------------------------------


def _final_val_loss(history: TrainHistory) -> float:
    return history.val_loss[-1][1] if history.val_loss else math.inf


def _sweep(exp: Experiment, base: TrainedModel[GPT], variant: Variant, epochs: float | None
           ) -> list[tuple[float, float | None]]:  # fmt: skip
    points = []
    for lr in variant.lr_grid:
        try:
            loss = _final_val_loss(variant_finetuned(exp, base, variant, lr, epochs=epochs).history)
        except FloatingPointError:  # diverged: the training loop stops on a non-finite loss
            loss = None
        points.append((lr, loss if loss is not None and math.isfinite(loss) else None))
    return points


def run_variants(
    exp: Experiment, base: TrainedModel[GPT], *, names: Sequence[str] | None = None, seeds: int = 3,
    epochs: float | None = None, lrs: Mapping[str, float] | None = None, timing_rounds: int = 5,
) -> VariantsResults:  # fmt: skip
    """Train and measure each variant (all of :data:`VARIANTS` unless ``names``) over ``seeds``
    seeds with ``epochs`` (None: the profile's budget). The lr of each comes from its sweep, or from
    ``lrs`` (no sweep) when given. ``timing_rounds`` rounds of :func:`step_time_ratios` (0: none)."""
    variants = [_variant(name) for name in (names or [v.name for v in VARIANTS])]
    floors = entropy_floors(exp)
    if floors is None:
        raise ValueError("the variants table measures distances to the entropy floor: use the built-in corpus")
    summaries, models = [], {}
    for variant in variants:
        sweep = [] if lrs is not None else _sweep(exp, base, variant, epochs)
        if lrs is not None:
            lr = lrs[variant.name]
        elif any(loss is not None for _, loss in sweep):
            lr = min((loss, lr) for lr, loss in sweep if loss is not None)[1]
        else:
            raise FloatingPointError(f"{variant.name}: every learning rate of its sweep diverged {variant.lr_grid}")
        runs = []
        for seed in range(seeds):
            trained = variant_finetuned(exp, base, variant, lr, seed=seed, epochs=epochs)
            result = evaluate(exp, trained)
            runs.append(VariantRun(seed, lr, result.target_ppl, result.source_ppl, result.valid_target_rate,
                                   trained.history.steps, trained.history.seconds))  # fmt: skip
        models[variant.name] = trained.model
        frozen = 0 if variant.full else frozen_bytes(trained.model)
        summaries.append(VariantSummary(variant.name, variant.label, lr, sweep, runs, trained.trainable_params, frozen))
    if timing_rounds and "lora" in models:
        ratios = step_time_ratios(exp, models, {s.name: s.lr for s in summaries}, rounds=timing_rounds)
        summaries = [dataclasses.replace(s, step_time_ratio=ratios[s.name]) for s in summaries]
    budget = epochs or exp.profile.finetune.epochs
    return VariantsResults(exp.profile.name, budget, seeds, floors, machine_description(), summaries)


def step_time_ratios(
    exp: Experiment, models: Mapping[str, nn.Module], lrs: Mapping[str, float], *, rounds: int = 5, steps: int = 3
) -> dict[str, list[float]]:
    """Each model's training step time over LoRA's, timed side by side: per round every model runs
    ``steps`` steps on the same batch, in an order rotated each round; one ratio per round. Returns
    ``[median, 25th, 75th percentile]`` per model. The models' weights change (throwaway copies)."""
    copies = {name: copy.deepcopy(model).train() for name, model in models.items()}
    block = exp.profile.model.block_size
    data = exp.splits.target_train[: exp.profile.batch_size * block + 1]
    x = data[:-1].view(exp.profile.batch_size, block).to(exp.device)
    y = data[1:].view(exp.profile.batch_size, block).to(exp.device)

    def stepper(name: str, model: nn.Module) -> Callable[[], None]:
        variant = _variant(name)
        groups = _param_groups(model, variant, lrs[name]) or [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(groups, lr=lrs[name])

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            optimizer.step()

        return step

    steppers = {name: stepper(name, model) for name, model in copies.items()}
    names, seconds = list(steppers), {name: [] for name in steppers}
    for name in names:  # warm-up
        steppers[name]()
    for r in tqdm(range(rounds), desc="step times", disable=not exp.progress, leave=False):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            seconds[name].append(time.perf_counter() - start)
    ratios = {}
    for name in names:
        per_round = [a / b for a, b in zip(seconds[name], seconds["lora"])]
        quartiles = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
        ratios[name] = [statistics.median(per_round), quartiles[0], quartiles[-1]]
    return ratios
