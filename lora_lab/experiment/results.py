"""The results of a run, typed: the one definition of ``results.json``.

The main job builds a :class:`RunResults` and writes it with :meth:`RunResults.to_json`; the
notebooks and ``paper/build.py`` read it back with :meth:`RunResults.from_json`, which checks
every field and names every problem it finds (:class:`ResultsError`)::

    {"format": 2, "corpus": str, "profile": str,
     "entropy_floor_ppl": {"source": float, "target": float} | null,
     "models": {"base": M, "lora_course": M, "lora": M, "full": M},
     "seeds": [int, ...],
     "across_seeds": {name: {"target_ppl": S, "source_ppl": S, "valid_target_rate": S (built-in corpus only)}},
     "recipes": {name: {"rank", "alpha", "lr", "target_modules", "epochs", "use_rslora"}},
     "profile_settings": {...}, "corpus_sha256": str, "split_sizes": {split: characters},
     "machine": str, "world_size": int (processes that trained; older files lack it: 1),
     "histories": {name: {"train_loss", "val_loss", "seconds", "steps"}},
     "claims": {claim: bool}, "note": str (optional)}
    M = {"target_ppl", "source_ppl", "trainable_params", "total_params", "train_seconds",
         "artifact_bytes" (null: none), "valid_target_rate" (null for real text), "samples": [str]}
    S = {"values": [one per seed], "mean", "min", "max"}

``models`` (and ``histories``) describe the run with the first seed; ``across_seeds`` holds every
seed's value and their mean and range (:mod:`lora_lab.experiment.seeds`). Format 2 added
``format``, ``seeds`` and ``across_seeds``; a format-1 file (lora_lab before multi-seed runs, one
seed) is refused with the advice to rerun ``lora-lab run``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ..files import json_text
from ..training import TrainHistory
from .seeds import SPREAD_METRICS as SPREAD_KEYS
from .seeds import Spread, spreads

__all__ = ["ModelResult", "RunResults", "ResultsError", "REQUIRED_MODELS", "RESULTS_FORMAT"]

#: The version of results.json's layout; bumped when a field is added, renamed or changes meaning.
RESULTS_FORMAT = 2

#: The models every run evaluates (its recipes add more).
REQUIRED_MODELS = ("base", "lora", "full")


class ResultsError(ValueError):
    """``results.json`` does not match the contract; the message lists every problem."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class ModelResult:
    """One model measured: perplexities on both held-out splits, size, cost and samples."""

    target_ppl: float
    source_ppl: float
    trainable_params: int  # trained during its own training (the base: all of them)
    total_params: int
    train_seconds: float
    artifact_bytes: int | None  # the file that stores what was trained
    valid_target_rate: float | None  # samples' complete lines that parse (built-in corpus only)
    samples: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def problems(name: str, entry: object) -> list[str]:
        """What is wrong with ``entry`` as the JSON of a model called ``name``."""
        if not isinstance(entry, dict):
            return [f"models.{name} must be an object"]
        problems = []
        for key in ("target_ppl", "source_ppl"):
            if not (_is_number(entry.get(key)) and entry[key] >= 1):
                problems.append(f"models.{name}.{key} must be a finite perplexity >= 1, got {entry.get(key)!r}")
        for key in ("trainable_params", "total_params"):
            if not _is_count(entry.get(key)):
                problems.append(f"models.{name}.{key} must be a non-negative integer, got {entry.get(key)!r}")
        trainable, total = entry.get("trainable_params"), entry.get("total_params")
        if _is_count(trainable) and _is_count(total) and not (total > 0 and trainable <= total):
            problems.append(f"models.{name}: need 0 < total_params and trainable_params <= total_params")
        if not (_is_number(entry.get("train_seconds")) and entry["train_seconds"] >= 0):
            problems.append(f"models.{name}.train_seconds must be a number >= 0, got {entry.get('train_seconds')!r}")
        if entry.get("artifact_bytes") is not None and not _is_count(entry["artifact_bytes"]):
            problems.append(f"models.{name}.artifact_bytes must be a non-negative integer or null")
        rate = entry.get("valid_target_rate")
        if rate is not None and not (_is_number(rate) and 0 <= rate <= 1):
            problems.append(f"models.{name}.valid_target_rate must be null or a number in [0, 1], got {rate!r}")
        samples = entry.get("samples")
        if not (isinstance(samples, list) and all(isinstance(s, str) for s in samples)):
            problems.append(f"models.{name}.samples must be a list of strings")
        return problems

    @classmethod
    def from_dict(cls, data: dict) -> ModelResult:
        return cls(
            float(data["target_ppl"]),
            float(data["source_ppl"]),
            data["trainable_params"],
            data["total_params"],
            float(data["train_seconds"]),
            data.get("artifact_bytes"),
            data.get("valid_target_rate"),
            list(data["samples"]),
        )


@dataclass
class RunResults:
    """Everything ``lora-lab run`` measured, in the order ``results.json`` lists it."""

    corpus: str
    profile: str
    entropy_floor_ppl: dict[str, float] | None
    models: dict[str, ModelResult]  # the run with the first seed
    seeds: list[int] = field(default_factory=lambda: [0])
    # {model: {metric: Spread}} over several seeds; with one seed it is left empty and follows ``models``
    across_seeds: dict[str, dict[str, Spread]] = field(default_factory=dict)
    recipes: dict[str, dict] = field(default_factory=dict)
    profile_settings: dict = field(default_factory=dict)
    corpus_sha256: str = ""
    split_sizes: dict[str, int] = field(default_factory=dict)
    machine: str = ""
    world_size: int = 1  # processes that trained the models together (torchrun); 1 for a plain run
    histories: dict[str, TrainHistory] = field(default_factory=dict)
    claims: dict[str, bool] = field(default_factory=dict)
    note: str | None = None

    def __post_init__(self) -> None:
        if len(self.seeds) > 1 and not self.across_seeds:
            raise ValueError(f"a run over seeds {self.seeds} needs across_seeds (a Spread per model and metric)")

    def seed_table(self) -> dict[str, dict[str, Spread]]:
        """``{model: {metric: Spread}}`` over the run's seeds; with one seed, one-value spreads of ``models``."""
        return self.across_seeds if len(self.seeds) > 1 else spreads([self.models])

    def spread(self, name: str, metric: str) -> Spread:
        """``metric`` of model ``name`` over the run's seeds (a one-value spread for one seed)."""
        try:
            return self.seed_table()[name][metric]
        except KeyError:
            raise KeyError(f"results.json has no {metric!r} over seeds for model {name!r}") from None

    def to_dict(self) -> dict:
        data = {"format": RESULTS_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        data["models"] = {name: entry.to_dict() for name, entry in self.models.items()}
        data["across_seeds"] = {
            name: {metric: spread.to_dict() for metric, spread in metrics.items()}
            for name, metrics in self.seed_table().items()
        }
        data["histories"] = {name: history.to_dict() for name, history in self.histories.items()}
        if self.note is None:
            del data["note"]
        return data

    def to_json(self) -> str:
        """The ``results.json`` text (NaN and infinity refused: they are not JSON)."""
        return json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str | dict, where: str = "results.json") -> RunResults:
        """Parse (text, or an already decoded object) and check against the contract."""
        if isinstance(text, str):
            try:
                text = json.loads(text, parse_constant=_reject_constant)
            except ValueError as error:
                raise ResultsError(f"{where} is not valid JSON: {error}") from error
        problems = cls.problems(text)
        if problems:
            raise ResultsError(
                f"{where} does not match the contract of `lora-lab run`:\n  - " + "\n  - ".join(problems)
            )
        data = text
        return cls(
            corpus=data["corpus"],
            profile=data["profile"],
            entropy_floor_ppl=data["entropy_floor_ppl"],
            models={name: ModelResult.from_dict(entry) for name, entry in data["models"].items()},
            seeds=list(data["seeds"]),
            across_seeds={  # checked above to agree with "models" when there is one seed
                name: {metric: Spread.from_dict(spread) for metric, spread in metrics.items()}
                for name, metrics in data["across_seeds"].items()
            }
            if len(data["seeds"]) > 1
            else {},
            recipes=data.get("recipes", {}),
            profile_settings=data.get("profile_settings", {}),
            corpus_sha256=data.get("corpus_sha256", ""),
            split_sizes=data.get("split_sizes", {}),
            machine=data.get("machine", ""),
            world_size=data.get("world_size", 1),
            histories={name: TrainHistory.from_dict(h) for name, h in data.get("histories", {}).items()},
            claims=data.get("claims", {}),
            note=data.get("note"),
        )

    @staticmethod
    def problems(data: object) -> list[str]:
        """Every way ``data`` (decoded JSON) breaks the contract; empty when it holds."""
        if not isinstance(data, dict):
            return [f"expected a JSON object, got {type(data).__name__}"]
        if "format" not in data:
            return [f"'format' is missing: this file was written by an older lora_lab (format 1, before "
                    f"multi-seed runs); rerun `lora-lab run` to write format {RESULTS_FORMAT}"]  # fmt: skip
        if data["format"] != RESULTS_FORMAT:
            return [f"'format' is {data['format']!r}, this lora_lab reads format {RESULTS_FORMAT}; "
                    "rerun `lora-lab run` with this lora_lab, or read it with the lora_lab that wrote it"]  # fmt: skip
        problems = [f"'{key}' must be a string" for key in ("corpus", "profile") if not isinstance(data.get(key), str)]
        known = ["format", *(f.name for f in dataclasses.fields(RunResults))]
        problems += [f"'{key}' is not a field of results.json (an older lora_lab's? 'checks' is now 'claims'); "
                     f"the fields are: {', '.join(known)}" for key in data if key not in known]  # fmt: skip
        if "entropy_floor_ppl" not in data:
            problems.append("'entropy_floor_ppl' is missing (use null when the corpus has no known floor)")
        elif (floors := data["entropy_floor_ppl"]) is not None and not (
            isinstance(floors, dict) and all(_is_number(floors.get(k)) and floors[k] >= 1 for k in ("source", "target"))
        ):
            problems.append("'entropy_floor_ppl' must be null or {'source': ppl >= 1, 'target': ppl >= 1}")
        if "world_size" in data and not (_is_count(data["world_size"]) and data["world_size"] >= 1):
            problems.append(f"'world_size' must be a positive integer (processes), got {data['world_size']!r}")
        if "note" in data and not isinstance(data["note"], str):
            problems.append("'note' must be a string")
        models = data.get("models")
        if not isinstance(models, dict):
            problems.append("'models' must be an object of model entries")
            models = {}
        problems += [f"models.{name} is missing (the run must evaluate base, lora and full)"
                     for name in REQUIRED_MODELS if name not in models]  # fmt: skip
        for name, entry in models.items():
            problems += ModelResult.problems(name, entry)
        problems += _seed_problems(data, models)
        for key in ("recipes", "profile_settings", "split_sizes", "histories", "claims"):
            if key in data and not isinstance(data[key], dict):
                problems.append(f"'{key}' must be an object when present")
        for name, recipe in _items(data, "recipes"):
            if not (
                isinstance(recipe, dict)
                and _is_count(recipe.get("rank"))
                and recipe["rank"] > 0
                and all(_is_number(recipe.get(k)) and recipe[k] > 0 for k in ("alpha", "lr"))
            ):
                problems.append(f"recipes.{name} must have a positive int 'rank' and positive 'alpha' and 'lr'")
            elif not (recipe.get("target_modules") is None or (
                isinstance(recipe["target_modules"], list) and all(isinstance(t, str) for t in recipe["target_modules"])
            )):
                problems.append(f"recipes.{name}.target_modules must be null or a list of module names")
        settings = data.get("profile_settings")
        shape = settings.get("model") if isinstance(settings, dict) else None
        if isinstance(settings, dict) and settings and not isinstance(shape, dict):
            problems.append("profile_settings must be nested as Profile.to_dict writes it ('model', 'pretrain', "
                            "'finetune', 'recipes', 'full', ...), not an older lora_lab's flat layout")  # fmt: skip
        for key, value in shape.items() if isinstance(shape, dict) else ():
            if key != "dropout" and not (_is_count(value) and value > 0):
                problems.append(f"profile_settings.model.{key} must be a positive integer, got {value!r}")
        if not all(_is_count(size) for _, size in _items(data, "split_sizes")):
            problems.append("split_sizes must map split names to character counts")
        for name, history in _items(data, "histories"):
            if not _is_history(history):
                problems.append(f"histories.{name} must have 'train_loss' (numbers), 'val_loss' ([step, loss] "
                                "pairs), a number 'seconds' and an integer 'steps'")  # fmt: skip
        if not all(isinstance(ok, bool) for _, ok in _items(data, "claims")):
            problems.append("claims must map claim names to true/false")
        return problems


def _seed_problems(data: dict, models: dict) -> list[str]:
    """What is wrong with ``seeds`` and ``across_seeds``: one spread per model and metric, one
    value per seed, the first seed's value the one ``models`` holds."""
    seeds = data.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(_is_count(s) for s in seeds) and len(set(seeds)) == len(seeds)):
        return [f"'seeds' must be a non-empty list of distinct non-negative integers, got {seeds!r}"]
    table = data.get("across_seeds")
    if not isinstance(table, dict):
        return ["'across_seeds' must be an object {model: {metric: {values, mean, min, max}}}"]
    problems = [f"across_seeds.{name} is not a model of 'models'" for name in table if name not in models]
    for name, entry in models.items():
        metrics = table.get(name)
        if not isinstance(metrics, dict):
            problems.append(f"across_seeds.{name} is missing (every model needs its values over the seeds)")
            continue
        expected = [m for m in SPREAD_KEYS if isinstance(entry, dict) and entry.get(m) is not None]
        if sorted(metrics) != sorted(expected):
            problems.append(f"across_seeds.{name} must hold exactly {expected}, got {sorted(metrics)}")
            continue
        for metric in expected:
            where = f"across_seeds.{name}.{metric}"
            found = Spread.problems(where, metrics[metric], len(seeds))
            if not found and metrics[metric]["values"][0] != entry[metric]:
                found = [f"{where}.values[0] must be the first seed's value, models.{name}.{metric}"]
            problems += found
    return problems


def _is_history(history: object) -> bool:
    """Whether ``history`` is the JSON of a :class:`~lora_lab.training.TrainHistory`."""
    if not isinstance(history, dict) or not (_is_number(history.get("seconds")) and _is_count(history.get("steps"))):
        return False
    losses, points = history.get("train_loss"), history.get("val_loss")
    return (isinstance(losses, list) and all(map(_is_number, losses)) and isinstance(points, list)
            and all(isinstance(p, list) and len(p) == 2 and _is_count(p[0]) and _is_number(p[1]) for p in points))


def _items(data: dict, key: str) -> list[tuple[str, object]]:
    """The entries of ``data[key]`` when it is an object (its absence or wrong type is reported apart)."""
    value = data.get(key)
    return list(value.items()) if isinstance(value, dict) else []


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")
