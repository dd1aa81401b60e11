"""The main job's stages: pretrain → LoRA (one per recipe) → full fine-tuning → measure.

``lora-lab run`` chains them (:mod:`lora_lab.experiment.run`); the notebooks call them one at a
time. Each training stage returns a :class:`TrainedModel` — the model, its loss history and the
file that stores what was trained — and :func:`evaluate` turns one into a
:class:`~lora_lab.experiment.results.ModelResult`.

Every trained artifact is cached under a key that hashes everything that determines it (the
stage's settings, the corpus's SHA-256, the base it started from, the package, torch and the
device type), so a rerun or a notebook reuses the pretrained base instead of training it again,
and a changed setting never picks up a stale artifact.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn

from .. import __version__
from ..data import CharTokenizer, Corpus, Splits, cache_dir, load_corpus, make_splits
from ..data import grammar as builtin
from ..lora import apply_lora_to_model, count_parameters, load_adapter, save_adapter
from ..model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from ..runtime import select_device
from ..seeding import seed_everything
from ..training import TrainConfig, TrainHistory, distributed, generate_samples, perplexity, train
from .config import LoRARecipe, Profile, get_profile, with_overrides
from .results import ModelResult

__all__ = [
    "Experiment",
    "TrainedModel",
    "prepare",
    "pretrained_base",
    "lora_finetuned",
    "full_finetuned",
    "evaluate",
    "entropy_floors",
    "eval_prompts",
]

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Experiment:
    """A corpus, its splits, a profile and where artifacts are cached: what every stage shares."""

    profile: Profile
    corpus: Corpus
    splits: Splits
    device: torch.device
    cache: Path
    progress: bool = True

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.splits.tokenizer

    def model_config(self) -> GPTConfig:
        return self.profile.model.gpt_config(self.tokenizer.vocab_size)


@dataclass(frozen=True)
class TrainedModel(Generic[M]):
    """What a training stage returns: the model (in eval mode), the history of its training, the
    file holding what was trained (the checkpoint, or the adapter's weights) and how many
    parameters that training updated."""

    name: str
    model: M
    history: TrainHistory
    artifact: Path
    trainable_params: int


def prepare(
    corpus: str = "builtin",
    profile: str | Profile = "cpu",
    *,
    overrides: Mapping[str, object] | None = None,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Experiment:
    """Load the corpus, tokenize and split it, and pick the device. ``overrides`` replaces
    profile fields by dotted name (``{"pretrain.epochs": 2}``)."""
    if isinstance(profile, Profile):
        settings = with_overrides(profile, overrides or {})
    else:
        settings = get_profile(profile, overrides)
    root = Path(cache) if cache is not None else cache_dir() / "artifacts"
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"the artifact cache {root} is a file, not a folder; pass another cache folder")
    world = distributed.current()
    with world.main_first():  # a download happens once, on rank 0; the other ranks read its file
        loaded = load_corpus(
            corpus, block_size=settings.model.block_size, builtin_chars=settings.builtin_chars, seed=settings.seed
        )
    device = world.device(select_device(device))
    return Experiment(settings, loaded, make_splits(loaded), device, root, progress and world.is_main)


# --- caching -------------------------------------------------------------------------------


def _key(**parts) -> str:
    parts.update(lora_lab=__version__, torch=torch.__version__.split("+")[0])
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def _reading_cached(final: Path) -> Iterator[None]:
    """Turn a failure to read a cached artifact (a truncated file, say, or one edited by hand) into
    one clear error that says how to recover: the folder is only a cache, so deleting it is safe."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise RuntimeError(
            f"the cached artifact {final} cannot be read ({error}); delete that folder and run again: "
            "it is rebuilt by training"
        ) from error


def _cached_stage(
    exp: Experiment,
    stage: str,
    key: str,
    build: Callable[[Path], TrainHistory],
    load: Callable[[Path, bool], tuple[M, Path]],
) -> tuple[M, TrainHistory, Path]:
    """The one pattern of every training stage: on a cache miss ``build(work_dir)`` trains and
    saves into a fresh folder that is renamed into place only when complete (so an interrupted
    run leaves no half-written artifact); then ``load(folder, built)`` gives the model and the
    file that stores what was trained, and the history is read back from the folder either way."""
    final = exp.cache / f"{stage}-{key}"
    world = distributed.current()  # under torchrun every rank trains; rank 0 alone writes the cache
    built = world.agree(not (final / "history.json").exists())
    if built:
        if world.is_main:
            exp.cache.mkdir(parents=True, exist_ok=True)
        # The other ranks save into private scratch folders, thrown away: only rank 0's artifact counts.
        work = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=exp.cache if world.is_main else None))
        try:
            history = build(work)
            if world.is_main:
                (work / "history.json").write_text(json.dumps(history.to_dict()))
                if final.exists():  # a concurrent run finished first; its artifact is equivalent
                    shutil.rmtree(work)
                else:
                    os.replace(work, final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        world.barrier()  # rank 0's artifact is in place before another rank reads it
    with _reading_cached(final):
        model, artifact = load(final, built and world.is_main)
        history = TrainHistory.from_dict(json.loads((final / "history.json").read_text()))
    return model, history, artifact


def _base_key(exp: Experiment) -> str:
    config = exp.profile.pretrain_config()
    return _key(
        stage="base",
        corpus=exp.corpus.sha256,
        model=exp.model_config().to_dict(),
        epochs=config.epochs,
        lr=config.lr,
        batch=config.batch_size,
        seed=config.seed,
        device=exp.device.type,
        # Left out when they are the defaults, so the keys of plain CPU runs stay as they were.
        **exp.profile.compute.resolve(exp.device).key(),
        **distributed.current().cache_key(),
    )


def _best(exp: Experiment) -> dict[str, bool]:
    """The cache key's part for early stopping: present only when it is on, so that every key of
    a run without it is what it always was."""
    return {"keep_best": True} if exp.profile.finetune.keep_best else {}


def _train(exp: Experiment, model: nn.Module, part: str, config: TrainConfig, desc: str, **options) -> TrainHistory:
    splits = exp.splits
    train_data, val_data = getattr(splits, f"{part}_train"), getattr(splits, f"{part}_val")
    block_size = exp.profile.model.block_size
    return train(model, train_data, val_data, config, block_size=block_size, device=exp.device, desc=desc,
                 progress=exp.progress, compute=exp.profile.compute, **options)  # fmt: skip


# --- stages --------------------------------------------------------------------------------


def pretrained_base(exp: Experiment) -> TrainedModel[GPT]:
    """The base GPT pretrained on the source part (train split), from the cache if present."""

    def build(work: Path) -> TrainHistory:
        config = exp.profile.pretrain_config()
        seed_everything(config.seed)
        model = GPT(exp.model_config())
        history = _train(exp, model, "source", config, "pretraining", restore_on_error=False)
        save_checkpoint(model, work / "model.safetensors")
        (work / "tokenizer.json").write_text(exp.tokenizer.to_json())
        return history

    def load(folder: Path, built: bool) -> tuple[GPT, Path]:
        tokenizer = CharTokenizer.from_json((folder / "tokenizer.json").read_text())
        if tokenizer != exp.tokenizer:
            raise ValueError("it was trained with another vocabulary")
        return load_checkpoint(folder / "model.safetensors", device=exp.device), folder / "model.safetensors"

    model, history, artifact = _cached_stage(exp, "base", _base_key(exp), build, load)
    return TrainedModel("base", model.eval(), history, artifact, model.num_parameters())


def lora_finetuned(exp: Experiment, base: TrainedModel[GPT], recipe: LoRARecipe | str) -> TrainedModel[nn.Module]:
    """A LoRA copy of ``base`` fine-tuned on the target part with ``recipe`` (a recipe, or the
    name of one of the profile's); ``base`` is not modified."""
    if isinstance(recipe, str):
        recipe = exp.profile.recipe(recipe)
    config = exp.profile.finetune_config(recipe.lr, recipe.epochs)
    key = _key(stage="lora", base=_base_key(exp), recipe=recipe.settings(), train=config.__dict__, **_best(exp))
    seed_everything(config.seed)  # A's random init comes from the global generator
    model = apply_lora_to_model(
        base.model,
        rank=recipe.rank,
        alpha=recipe.alpha,
        target_modules=list(recipe.target_modules) if recipe.target_modules else None,
        use_rslora=recipe.use_rslora,
    )
    trainable, _ = count_parameters(model)

    def build(work: Path) -> TrainHistory:
        history = _train(exp, model, "target", config, recipe.name, keep_best=exp.profile.finetune.keep_best)
        save_adapter(model, work / "adapter")
        return history

    def load(folder: Path, built: bool) -> tuple[nn.Module, Path]:
        if not built:  # on a cache miss the model in hand is the one just trained
            load_adapter(model, folder / "adapter")
        return model, folder / "adapter" / "adapter_model.safetensors"

    model, history, artifact = _cached_stage(exp, "lora", key, build, load)
    return TrainedModel(recipe.name, model.eval(), history, artifact, trainable)


def full_finetuned(exp: Experiment, base: TrainedModel[GPT]) -> TrainedModel[GPT]:
    """A copy of ``base`` with every weight fine-tuned on the target part."""
    config = exp.profile.finetune_config(exp.profile.full.lr)
    key = _key(stage="full", base=_base_key(exp), train=config.__dict__, **_best(exp))

    def build(work: Path) -> TrainHistory:
        seed_everything(config.seed)
        model = copy.deepcopy(base.model)  # a private copy: a failed run just discards it
        for param in model.parameters():
            param.requires_grad = True
        history = _train(exp, model, "target", config, "full fine-tuning", restore_on_error=False,
                         keep_best=exp.profile.finetune.keep_best)  # fmt: skip
        save_checkpoint(model, work / "model.safetensors")
        return history

    def load(folder: Path, built: bool) -> tuple[GPT, Path]:
        return load_checkpoint(folder / "model.safetensors", device=exp.device), folder / "model.safetensors"

    model, history, artifact = _cached_stage(exp, "full", key, build, load)
    return TrainedModel("full", model.eval(), history, artifact, model.num_parameters())


# --- evaluation ----------------------------------------------------------------------------


def entropy_floors(exp: Experiment) -> dict[str, float] | None:
    """The exact perplexity floor of each domain (built-in corpus only)."""
    if not exp.corpus.builtin:
        return None
    return {domain: builtin.entropy_floor_ppl(domain) for domain in ("source", "target")}


def eval_prompts(exp: Experiment) -> list[str]:
    """Fixed prompts for samples: the built-in corpus's target prompts, or for real text the
    first words of evenly spaced lines of the target validation split."""
    if exp.corpus.builtin:
        return list(builtin.EVAL_PROMPTS["target"])
    text = exp.tokenizer.decode(exp.splits.target_val)
    lines = [line for line in text.split("\n")[1:-1] if len(line.strip()) >= 8]
    if not lines:
        return [text[:8]]
    picks = [lines[int(i * len(lines) / 4)] for i in range(min(4, len(lines)))]
    return [line[: max(4, line.find(" ", 4))] for line in picks]


def evaluate(exp: Experiment, trained: TrainedModel) -> ModelResult:
    """Measure one trained model: held-out perplexities, size, cost, samples and (on the
    built-in corpus) how many of the samples' complete lines are valid target sentences."""
    model, block = trained.model, exp.profile.model.block_size
    samples = generate_samples(
        model,
        exp.tokenizer,
        eval_prompts(exp),
        max_new_tokens=exp.profile.sample_tokens,
        seed=exp.profile.seed,
        device=exp.device,
    )
    valid = None
    if exp.corpus.builtin:
        # Pool the complete lines of every sample (each sample's last line is cut off mid-way).
        lines = [line for sample in samples for line in sample.split("\n")[:-1]]
        valid = builtin.validity_rate("".join(line + "\n" for line in lines), "target") if lines else 0.0
    return ModelResult(
        target_ppl=perplexity(model, exp.splits.target_val, block, device=exp.device),
        source_ppl=perplexity(model, exp.splits.source_val, block, device=exp.device),
        trainable_params=trained.trainable_params,
        total_params=count_parameters(model)[1],
        train_seconds=trained.history.seconds,
        artifact_bytes=trained.artifact.stat().st_size,
        valid_target_rate=valid,
        samples=samples,
    )
