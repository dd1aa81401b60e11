"""Several seeds: the headline comparison repeated, each number reported as a mean and a spread.

One training run is one draw: another seed gives another initialisation, another batch order,
another random A and other samples, and the perplexities move. ``lora-lab run --seeds 3`` trains
the whole comparison (base, every recipe, full fine-tuning) once per seed and ``results.json``
keeps every seed's value (:class:`Spread`).

What a seed varies: the training only. The corpus is drawn once, with the first seed (the
profile's ``seed``), and every seed is measured on the same splits, so the spread is that of
the method, not of the data. Seed ``s`` pretrains with ``s``, fine-tunes with ``s + 1`` and
samples with ``s + i`` for prompt ``i``, exactly as a one-seed run with ``--set seed=s`` would
(on the corpus of the first seed).

The spread is the **range**: the lowest and the highest value over the seeds. With three seeds a
standard deviation would itself be a noisy estimate; the range hides nothing. Tables print
``mean ± d`` where ``d`` is the largest distance of any seed from the printed mean, rounded up
at the printed precision, so every seed lies inside the interval as printed. Claims
(:func:`lora_lab.experiment.run.claims`) are judged at the unfavourable end of each range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import with_overrides

if TYPE_CHECKING:  # results.py builds on this module, and stages.py on results.py
    from .results import ModelResult
    from .stages import Experiment

__all__ = ["Spread", "SPREAD_METRICS", "seed_list", "seed_experiment", "spreads"]

#: The measurements kept per seed (a metric that is null, as validity on real text, is left out).
SPREAD_METRICS = ("target_ppl", "source_ppl", "valid_target_rate")


@dataclass(frozen=True)
class Spread:
    """One measurement over several seeds: every value (in the order of the run's seeds), their
    mean and their range."""

    values: tuple[float, ...]
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (one per seed; at least one)."""
        values = tuple(float(v) for v in values)
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a spread needs at least one finite value, got {values!r}")
        return cls(values, math.fsum(values) / len(values), min(values), max(values))

    @property
    def deviation(self) -> float:
        """The largest distance of a seed from the mean: every seed lies in mean ± deviation."""
        return max(self.high - self.mean, self.mean - self.low)

    def below(self, other: Spread) -> bool:
        """Whether every seed's value is below every seed's value of ``other``: a difference the
        seeds resolve (the unfavourable end of each range decides)."""
        return self.high < other.low

    def overlaps(self, other: Spread) -> bool:
        """Whether the two ranges share a value: the seeds cannot tell the two apart."""
        return not (self.below(other) or other.below(self))

    def format(self, digits: int = 3, *, scale: float = 1.0, unit: str = "") -> str:
        """``mean ± d`` with ``digits`` decimals (just the value when there is one seed), of the
        values times ``scale`` (100 for percentages, with ``unit="%"``). ``d`` is rounded *up* from
        the largest distance of a seed to the *printed* mean, so that every seed lies inside the
        interval as printed: 83.2% with seeds from 81.1% to 85.5% prints "83% ± 3", not "± 2"."""
        mean, low, high = (scale * v for v in (self.mean, self.low, self.high))
        shown = round(mean, digits)
        if len(self.values) == 1:
            return f"{shown:.{digits}f}{unit}"
        step = 10.0**-digits
        d = math.ceil(max(high - shown, shown - low) / step - 1e-9) * step  # 1e-9: a float's last bit is no excess
        return f"{shown:.{digits}f}{unit} ± {d:.{digits}f}"

    def to_dict(self) -> dict:
        return {"values": list(self.values), "mean": self.mean, "min": self.low, "max": self.high}

    @classmethod
    def from_dict(cls, data: Mapping) -> Spread:
        return cls.of(data["values"])

    @staticmethod
    def problems(where: str, data: object, n_seeds: int) -> list[str]:
        """What is wrong with ``data`` as the JSON of a spread over ``n_seeds`` seeds."""
        values = data.get("values") if isinstance(data, dict) else None
        if not (isinstance(values, list) and len(values) == n_seeds and all(_is_number(v) for v in values)):
            return [f"{where}.values must list one number per seed ({n_seeds}), got {values!r}"]
        expected = Spread.of(values).to_dict()
        wrong = [key for key in ("mean", "min", "max") if data.get(key) != expected[key]]
        if wrong:
            return [f"{where}: {', '.join(wrong)} do not follow from its values (expected {expected})"]
        return []


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_list(first: int, count: int) -> list[int]:
    """The seeds of a run of ``count`` seeds starting at ``first`` (the profile's seed)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of seeds must be a positive int (e.g. --seeds 3), got {count!r}")
    return [first + i for i in range(count)]


def seed_experiment(exp: Experiment, seed: int) -> Experiment:
    """``exp`` trained with another seed: the same corpus and splits, the profile's ``seed``
    replaced (so every stage's cache key, which includes its seed, is that seed's)."""
    if seed == exp.profile.seed:
        return exp
    return dataclasses.replace(exp, profile=with_overrides(exp.profile, {"seed": seed}))


def spreads(per_seed: Sequence[Mapping[str, ModelResult]]) -> dict[str, dict[str, Spread]]:
    """``{model: {metric: Spread}}`` from one ``{model: ModelResult}`` per seed (the same models
    in each); a metric that is null in any seed (validity on real text) is left out."""
    if not per_seed:
        raise ValueError("spreads needs the results of at least one seed")
    names = list(per_seed[0])
    if any(list(results) != names for results in per_seed):
        raise ValueError(f"every seed must measure the same models, got {[list(r) for r in per_seed]}")
    table: dict[str, dict[str, Spread]] = {}
    for name in names:
        table[name] = {}
        for metric in SPREAD_METRICS:
            values = [getattr(results[name], metric) for results in per_seed]
            if all(v is not None for v in values):
                table[name][metric] = Spread.of(values)
    return table
