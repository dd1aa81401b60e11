"""The main job, stage by stage: pretrain → LoRA (seed recipe, tuned recipe) → full
fine-tuning → comparison. ``lora-lab run`` chains the stages; the notebooks call them one
at a time.

Every trained artifact is cached under a key that hashes everything that determines it
(the stage's settings, the corpus's SHA-256, the base it started from, the package, torch
and device type), so a rerun or a notebook reuses the pretrained base instead of training
it again, and a changed setting never picks up a stale artifact.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .adapters import load_adapter, save_adapter
from .data import CharTokenizer, Corpus, Splits, cache_dir, load_corpus, make_splits
from .evaluate import generate_samples, perplexity
from .inject import apply_lora_to_model, count_parameters
from .model import GPT, GPTConfig, load_checkpoint, save_checkpoint, select_device
from .profiles import Profile, get_profile, with_overrides
from .seeding import seed_everything
from .train import TrainConfig, TrainResult, train

__all__ = [
    "Experiment",
    "LoRARecipe",
    "prepare",
    "pretrained_base",
    "lora_finetuned",
    "full_finetuned",
    "evaluate_model",
    "entropy_floors",
    "eval_prompts",
]


@dataclass(frozen=True)
class LoRARecipe:
    """How to LoRA-fine-tune: rank, α, learning rate, which modules (None = every nn.Linear) and
    for how many epochs (None = the profile's ``finetune_epochs``; sweeps use fewer)."""

    name: str
    rank: int
    alpha: float
    lr: float
    target_modules: tuple[str, ...] | None = None
    epochs: float | None = None
    use_rslora: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "lr": self.lr,
            "target_modules": list(self.target_modules) if self.target_modules else None,
            "epochs": self.epochs,
            "use_rslora": self.use_rslora,
        }


@dataclass
class Experiment:
    """A corpus, its splits and a profile: everything the stages share."""

    profile: Profile
    corpus: Corpus
    splits: Splits
    device: torch.device
    cache: Path
    progress: bool = True
    trained: dict[str, TrainResult] = field(default_factory=dict)

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.splits.tokenizer

    def model_config(self) -> GPTConfig:
        p = self.profile
        return GPTConfig(
            vocab_size=self.tokenizer.vocab_size,
            block_size=p.block_size,
            n_layer=p.n_layer,
            n_head=p.n_head,
            n_embd=p.n_embd,
            dropout=p.dropout,
        )

    def seed_recipe(self) -> LoRARecipe:
        p = self.profile
        return LoRARecipe("lora_seed", p.lora_rank, p.lora_alpha, p.lora_lr)

    def tuned_recipe(self) -> LoRARecipe:
        p = self.profile
        return LoRARecipe("lora", p.tuned_rank, p.tuned_alpha, p.tuned_lr)

    def finetune_config(self, lr: float, epochs: float | None = None) -> TrainConfig:
        p = self.profile
        return TrainConfig(epochs=epochs or p.finetune_epochs, lr=lr, batch_size=p.batch_size, seed=p.seed + 1)


def prepare(
    corpus: str = "builtin",
    profile: str | Profile = "cpu",
    *,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides,
) -> Experiment:
    """Load the corpus, tokenize and split it, and pick the device."""
    prof = with_overrides(profile, **overrides) if isinstance(profile, Profile) else get_profile(profile, **overrides)
    root = Path(cache) if cache is not None else cache_dir() / "artifacts"
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"the artifact cache {root} is a file, not a folder; pass another cache folder")
    loaded = load_corpus(corpus, block_size=prof.block_size, builtin_chars=prof.builtin_chars, seed=prof.seed)
    splits = make_splits(loaded)
    return Experiment(prof, loaded, splits, select_device(device), root, progress)


# --- caching -------------------------------------------------------------------------------


def _key(**parts) -> str:
    parts.update(lora_lab=__version__, torch=torch.__version__.split("+")[0])
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def _artifact_dir(exp: Experiment, stage: str, key: str):
    """Yield ``(final_dir, work_dir or None)``. ``work_dir`` is None on a cache hit; else the
    caller writes into it and it is renamed into place atomically on success."""
    final = exp.cache / f"{stage}-{key}"
    if (final / "history.json").exists():
        yield final, None
        return
    exp.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=exp.cache))
    try:
        yield final, work
        if final.exists():  # a concurrent run finished first; its artifact is equivalent
            shutil.rmtree(work)
        else:
            os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _reading_cached(final: Path):
    """Turn a failure to read a cached artifact (a truncated file, say, or one edited by hand) into
    one clear error that says how to recover: the folder is only a cache, so deleting it is safe."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise RuntimeError(
            f"the cached artifact {final} cannot be read ({error}); delete that folder and run again: "
            "it is rebuilt by training"
        ) from error


def _base_key(exp: Experiment) -> str:
    p = exp.profile
    return _key(
        stage="base",
        corpus=exp.corpus.sha256,
        model=exp.model_config().to_dict(),
        epochs=p.pretrain_epochs,
        lr=p.pretrain_lr,
        batch=p.batch_size,
        seed=p.seed,
        device=exp.device.type,
    )


# --- stages --------------------------------------------------------------------------------


def pretrained_base(exp: Experiment) -> GPT:
    """The base GPT pretrained on the source part (train split), from the cache if present."""
    key = _base_key(exp)
    with _artifact_dir(exp, "base", key) as (final, work):
        if work is not None:
            seed_everything(exp.profile.seed)
            model = GPT(exp.model_config())
            config = TrainConfig(
                epochs=exp.profile.pretrain_epochs,
                lr=exp.profile.pretrain_lr,
                batch_size=exp.profile.batch_size,
                weight_decay=0.1,
                seed=exp.profile.seed,
            )
            history = train(
                model,
                exp.splits.source_train,
                exp.splits.source_val,
                config,
                block_size=exp.profile.block_size,
                device=exp.device,
                desc="pretraining",
                progress=exp.progress,
            )
            save_checkpoint(model, work / "model.safetensors")
            (work / "tokenizer.json").write_text(exp.tokenizer.to_json())
            (work / "history.json").write_text(json.dumps(history.to_dict()))
    with _reading_cached(final):
        model = load_checkpoint(final / "model.safetensors", device=exp.device)
        tokenizer = CharTokenizer.from_json((final / "tokenizer.json").read_text())
        history = TrainResult.from_dict(json.loads((final / "history.json").read_text()))
    if tokenizer != exp.tokenizer:
        raise RuntimeError(f"cached base model {final} was trained with another vocabulary; delete that folder")
    exp.trained["base"] = history
    model.artifact_path = final / "model.safetensors"
    return model.eval()


def lora_finetuned(exp: Experiment, base: GPT, recipe: LoRARecipe | None = None) -> nn.Module:
    """A LoRA copy of ``base`` fine-tuned on the target part; ``base`` is not modified."""
    recipe = recipe or exp.tuned_recipe()
    config = exp.finetune_config(recipe.lr, recipe.epochs)
    # The recipe's name is a label, not a setting: the same settings under another name reuse the artifact.
    settings = {k: v for k, v in recipe.to_dict().items() if k != "name"}
    key = _key(stage="lora", base=_base_key(exp), recipe=settings, train=config.__dict__)
    seed_everything(config.seed)  # A's random init comes from the global generator
    model = apply_lora_to_model(
        base,
        rank=recipe.rank,
        alpha=recipe.alpha,
        target_modules=list(recipe.target_modules) if recipe.target_modules else None,
        use_rslora=recipe.use_rslora,
    )
    with _artifact_dir(exp, "lora", key) as (final, work):
        if work is not None:
            history = train(
                model,
                exp.splits.target_train,
                exp.splits.target_val,
                config,
                block_size=exp.profile.block_size,
                device=exp.device,
                desc=recipe.name,
                progress=exp.progress,
            )
            save_adapter(model, work / "adapter")
            (work / "history.json").write_text(json.dumps(history.to_dict()))
    with _reading_cached(final):
        if work is None:
            load_adapter(model, final / "adapter")
        exp.trained[recipe.name] = TrainResult.from_dict(json.loads((final / "history.json").read_text()))
    model.artifact_path = final / "adapter" / "adapter_model.safetensors"
    return model.eval()


def full_finetuned(exp: Experiment, base: GPT) -> GPT:
    """A copy of ``base`` with every weight fine-tuned on the target part."""
    config = exp.finetune_config(exp.profile.full_lr)
    key = _key(stage="full", base=_base_key(exp), train=config.__dict__)
    with _artifact_dir(exp, "full", key) as (final, work):
        if work is not None:
            seed_everything(config.seed)
            model = copy.deepcopy(base)
            for param in model.parameters():
                param.requires_grad = True
            history = train(
                model,
                exp.splits.target_train,
                exp.splits.target_val,
                config,
                block_size=exp.profile.block_size,
                device=exp.device,
                desc="full fine-tuning",
                progress=exp.progress,
            )
            save_checkpoint(model, work / "model.safetensors")
            (work / "history.json").write_text(json.dumps(history.to_dict()))
    with _reading_cached(final):
        model = load_checkpoint(final / "model.safetensors", device=exp.device)
        exp.trained["full"] = TrainResult.from_dict(json.loads((final / "history.json").read_text()))
    model.artifact_path = final / "model.safetensors"
    return model.eval()


# --- evaluation ----------------------------------------------------------------------------


def entropy_floors(exp: Experiment) -> dict[str, float] | None:
    """The exact perplexity floor of each domain (built-in corpus only)."""
    if not exp.corpus.is_builtin:
        return None
    from .corpus import entropy_floor_ppl

    return {"source": entropy_floor_ppl("source"), "target": entropy_floor_ppl("target")}


def eval_prompts(exp: Experiment) -> list[str]:
    """Fixed prompts for samples: the built-in corpus's target prompts, or for real text the
    first words of evenly spaced lines of the target validation split."""
    if exp.corpus.is_builtin:
        from .corpus import EVAL_PROMPTS

        return list(EVAL_PROMPTS["target"])
    text = exp.tokenizer.decode(exp.splits.target_val)
    lines = [line for line in text.split("\n")[1:-1] if len(line.strip()) >= 8]
    if not lines:
        return [text[:8]]
    picks = [lines[int(i * len(lines) / 4)] for i in range(min(4, len(lines)))]
    return [line[: max(4, line.find(" ", 4))] for line in picks]


def evaluate_model(exp: Experiment, model: nn.Module, name: str) -> dict:
    """The results.json entry ``M`` for one model."""
    from .corpus import is_valid

    block = exp.profile.block_size
    trainable, total = count_parameters(model)
    samples = generate_samples(
        model,
        exp.tokenizer,
        eval_prompts(exp),
        max_new_tokens=exp.profile.sample_tokens,
        seed=exp.profile.seed,
        device=exp.device,
    )
    valid = None
    if exp.corpus.is_builtin:
        # Pool the complete lines of every sample (each sample's last line is cut off mid-way).
        lines = [line for sample in samples for line in sample.split("\n")[:-1]]
        valid = sum(is_valid(line, "target") for line in lines) / len(lines) if lines else 0.0
    history = exp.trained.get(name)
    path = getattr(model, "artifact_path", None)
    return {
        "target_ppl": perplexity(model, exp.splits.target_val, block, device=exp.device),
        "source_ppl": perplexity(model, exp.splits.source_val, block, device=exp.device),
        "trainable_params": trainable if name != "base" else total,
        "total_params": total,
        "train_seconds": history.seconds if history else 0.0,
        "artifact_bytes": path.stat().st_size if path else None,
        "valid_target_rate": valid,
        "samples": samples,
    }


def machine_description() -> str:
    return (
        f"{platform.machine()} · {os.cpu_count()} CPUs · torch {torch.__version__} · {torch.get_num_threads()} threads"
    )
