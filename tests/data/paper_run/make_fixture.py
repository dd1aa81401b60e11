"""Write the TEST FIXTURE run directory used by tests/test_paper.py.

It imitates what ``lora-lab run`` writes (``results.json``, ``sweep.json`` and the PNG
figures) and, as ``bench.json``, what the benchmark suite writes (``benchmarks/results/latest.json``),
so that the companion reading (``paper/``) can be built and tested without running any
experiment. Every number here is made up — plausible for a cpu-profile-like 0.8M-parameter
character GPT on the built-in corpus, but not measured — and ``results.json`` says so in its
``note`` field, which the PDF prints on its title page. ``results.json`` is built from lora_lab's
own types (:class:`~lora_lab.experiment.results.RunResults`, :class:`~lora_lab.experiment.config.Profile`)
and written by ``RunResults.to_json``, so its layout is the one ``lora-lab run`` writes; the bench
ids and model keys follow ``benchmarks/bench.py``. Regenerate with::

    .venv/bin/python tests/data/paper_run/make_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lora_lab.experiment.config import (  # noqa: E402
    COURSE_RECIPE,
    TUNED_RECIPE,
    FinetuneSettings,
    FullFinetuneSettings,
    LoRARecipe,
    ModelSettings,
    PretrainSettings,
    Profile,
)
from lora_lab.experiment.results import ModelResult, RunResults  # noqa: E402
from lora_lab.experiment.run import claims  # noqa: E402
from lora_lab.training import TrainHistory  # noqa: E402

HERE = Path(__file__).resolve().parent
NOTE = (
    "TEST FIXTURE for tests/test_paper.py: hand-made, plausible numbers, NOT measured. "
    "Run make pdf to build the reading from a real lora-lab run."
)

# The fixture's GPT (4 blocks, d_model = 128, 34 characters) has 818,432 parameters; LoRA on
# every nn.Linear (q, k, v, o, mlp.up, mlp.down of each block and lm_head) adds 9,378 per unit
# of rank — the numbers lora_lab.count_parameters gives for that model.
BASE_PARAMS = 818_432
PARAMS_PER_RANK = 9_378
FLOORS = {"source": 1.6788, "target": 1.5874}
PROMPTS = ("the sailor ", "does the captain ", "the crew loads the ", "the cook that ")


def _model(
    target: float,
    source: float,
    rank: int | None,
    seconds: float,
    artifact: int,
    valid: float,
    samples: tuple[str, ...],
) -> ModelResult:
    """A results.json model entry; ``rank=None`` means every parameter is trained."""
    trainable = BASE_PARAMS if rank is None else rank * PARAMS_PER_RANK
    return ModelResult(
        target_ppl=target,
        source_ppl=source,
        trainable_params=trainable,
        total_params=BASE_PARAMS + (0 if rank is None else trainable),
        train_seconds=seconds,
        artifact_bytes=artifact,
        valid_target_rate=valid,
        samples=[p + s for p, s in zip(PROMPTS, samples, strict=True)],
    )


MODELS = {
    "base": _model(
        2.4137,
        1.7215,
        None,
        412.7,
        3_290_560,
        0.115,
        (
            "sees the cow near the barn.\nthe fox runs again.\n",
            "sees the hen.\nat night, the dog digs.\n",
            "goat.\nthe owl sleeps in the wood.\n",
            "the farmer feeds the pig.\n",
        ),
    ),
    COURSE_RECIPE: _model(
        2.2081,
        1.7229,
        4,
        58.9,
        151_184,
        0.305,
        (
            "sees the boat near the barn.\nthe crew waits.\n",
            "sees the ship?\nmy cook sings by the dock.\n",
            "net.\nthe gull sleeps on the fence.\n",
            "the sailor sees the net.\n",
        ),
    ),
    TUNED_RECIPE: _model(
        1.6724,
        1.7583,
        8,
        61.3,
        301_232,
        0.845,
        (
            "loads the salt, the rope and the net.\n",
            "see the wet boat?\nthe pilot rows by the dock.\n",
            "barrel.\nour old gull waits on the pier.\n",
            "mends the net sings.\n",
        ),
    ),
    "full": _model(
        1.6391,
        2.0817,
        None,
        74.8,
        3_290_560,
        0.88,
        (
            "steers the boat.\nthe mate that loads the oar rows.\n",
            "hear the crew?\nmy diver swims now.\n",
            "rope, the map and the lamp.\n",
            "rows the boat waits.\n",
        ),
    ),
}


def _history(steps: int, seconds: float, start: float, end: float) -> TrainHistory:
    """A short, made-up training history (a few points, where a real one has every step)."""
    points = np.linspace(0, steps, 6).astype(int)
    losses = end + (start - end) * np.exp(-points / (steps / 4))
    return TrainHistory(
        train_loss=[round(float(v), 4) for v in losses],
        val_loss=[(int(s), round(float(v), 4)) for s, v in zip(points, losses, strict=True)],
        seconds=seconds,
        steps=steps,
    )


# The profile the fixture's run claims to have used: shaped like the cpu profile, with the
# fixture's own (made-up) model and budget.
PROFILE = Profile(
    name="cpu",
    model=ModelSettings(block_size=128, n_layer=4, n_head=4, n_embd=128),
    pretrain=PretrainSettings(epochs=4.0, lr=3e-3),
    finetune=FinetuneSettings(epochs=5.0),
    recipes=(
        LoRARecipe(COURSE_RECIPE, rank=4, alpha=1.0, lr=1e-3),
        LoRARecipe(TUNED_RECIPE, rank=8, alpha=16.0, lr=3e-3),
    ),
    full=FullFinetuneSettings(lr=1e-3),
    batch_size=32,
    sample_tokens=200,
)

RESULTS = RunResults(
    corpus="builtin",
    profile=PROFILE.name,
    entropy_floor_ppl=FLOORS,
    models=MODELS,
    recipes={recipe.name: recipe.to_dict() for recipe in PROFILE.recipes},
    profile_settings=PROFILE.to_dict(),
    corpus_sha256="0" * 64,
    split_sizes={"source_train": 288_000, "source_val": 32_000, "target_train": 72_000, "target_val": 8_000},
    machine="x86_64 · 2 CPUs · torch 2.13.0 · 2 threads (fixture)",
    histories={
        "base": _history(2400, 412.7, 3.4, 0.56),
        COURSE_RECIPE: _history(600, 58.9, 0.88, 0.79),
        TUNED_RECIPE: _history(600, 61.3, 0.88, 0.515),
        "full": _history(600, 74.8, 0.88, 0.494),
    },
    note=NOTE,
)
RESULTS.claims = claims(RESULTS)  # the main job's own claims, judged on the made-up numbers

SWEEP_RANKS = (1, 2, 4, 8, 16, 32)
SWEEP_TARGET = (1.7412, 1.7055, 1.6853, 1.6724, 1.6689, 1.6671)
SWEEP_SOURCE = (1.7312, 1.7398, 1.7490, 1.7583, 1.7655, 1.7702)
SWEEP = {
    "note": NOTE,
    "runs": [
        {"rank": r, "alpha": 2.0 * r, "target_ppl": t, "source_ppl": s, "trainable_params": r * PARAMS_PER_RANK}
        for r, t, s in zip(SWEEP_RANKS, SWEEP_TARGET, SWEEP_SOURCE, strict=True)
    ],
}


# What `make bench` (benchmarks/bench.py) writes to benchmarks/results/latest.json, cut down to
# what the paper reads: the machine, the models' descriptions and one row per quoted ratio. The
# ratios are made up too, with four decimals so that tests can find them in the PDF.
BENCH_MODELS = {
    "cpu": "cpu profile: d=128, 4 layers, 4 heads, block 128, vocab 34, 0.82M params, batch 32×128",
    "7m": "7.2M GPT: d=384, 4 layers, 6 heads, block 128, vocab 34, 7.20M params, batch 32×128",
    "course": "course profile: d=408, 4 layers, 6 heads, block 256, vocab 34, 8.17M params, batch 64×256",
}
BENCH_RATIOS = {
    "train.cpu.lora_lab_vs_full": 0.8812,
    "train.cpu.lora_lab_plain_vs_full": 1.1234,
    "train.cpu.peft_vs_full": 1.2755,
    "train.cpu.loralib_vs_full": 1.2199,
    "train.cpu.course_vs_full": 1.5521,
    "train.cpu.frozen_vs_full": 0.7321,
    "train.7m.lora_lab_vs_full": 0.7466,
    "train.7m.lora_lab_plain_vs_full": 1.0143,
    "train.7m.peft_vs_full": 0.9588,
    "train.7m.loralib_vs_full": 1.0311,
    "train.7m.course_vs_full": 1.6543,
    "train.7m.frozen_vs_full": 0.6987,
    "infer.7m.unmerged_vs_base": 1.0234,
    "infer.7m.merged_vs_base": 0.9912,
    "memory.course.lora_lab_vs_full": 0.9611,
    "memory.course.frozen_vs_full": 0.7812,
    "memory.course.small_batch.lora_lab_vs_full": 0.8133,
}


def _bench_row(row_id: str, ratio: float) -> dict:
    kind, model = row_id.split(".")[:2]
    details: dict = {"model": BENCH_MODELS[model]}
    if kind == "train":
        details |= {"rounds": 3, "seconds_per_round": {"full": [0.61, 0.74, 0.58]}}
    if kind == "memory":
        details["batch"] = "4×256" if "small_batch" in row_id else "64×256"
    return {"id": row_id, "description": row_id, "ratio": ratio, "details": details, "passed": None}


BENCH = {
    "note": NOTE,
    "quick": False,
    "machine": {
        "cpu": "TEST FIXTURE CPU",
        "logical_cores": 2,
        "torch": "2.13.0+cpu",
        "torch_threads": 1,
        "load_average_at_start": [3.2, 2.9, 2.5],
        "load_average_at_end": [4.4, 3.1, 2.6],
        "busy": True,
    },
    "settings": {
        "rank": 4,
        "alpha": 1.0,
        "targets": ["q", "k", "v", "o", "up", "down"],
        "models": {key: {"description": description} for key, description in BENCH_MODELS.items()},
    },
    "rows": [_bench_row(row_id, ratio) for row_id, ratio in BENCH_RATIOS.items()],
}


def _stamp(ax: plt.Axes) -> None:
    ax.text(
        0.5,
        0.5,
        "TEST FIXTURE",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=22,
        color="0.85",
        rotation=20,
        zorder=0,
    )


def _save(fig: plt.Figure, name: str) -> None:
    fig.tight_layout()
    fig.savefig(HERE / name, dpi=60)  # small files: this is only a fixture
    plt.close(fig)


def main() -> None:
    text = RESULTS.to_json()
    RunResults.from_json(text)  # what paper/build.py will check; fails here rather than in the tests
    (HERE / "results.json").write_text(text, encoding="utf-8")
    (HERE / "sweep.json").write_text(json.dumps(SWEEP, indent=2) + "\n")
    (HERE / "bench.json").write_text(json.dumps(BENCH, indent=2, ensure_ascii=False) + "\n")

    # Two panels like lora_lab.analysis.figures.plot_loss_curves: pretraining left, fine-tuning right.
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, names in ((left, ("base",)), (right, (COURSE_RECIPE, TUNED_RECIPE, "full"))):
        for name in names:
            steps, losses = zip(*RESULTS.histories[name].val_loss, strict=True)
            ax.plot(steps, losses, "o-", label=name)
        ax.set(xlabel="step", ylabel="validation loss (nats/char)")
        ax.legend()
        _stamp(ax)
    left.axhline(np.log(FLOORS["source"]), ls="--", color="k", lw=1)
    right.axhline(np.log(FLOORS["target"]), ls="--", color="k", lw=1)
    _save(fig, "loss_curves.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(RESULTS.models)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [RESULTS.models[n].source_ppl for n in names], 0.4, label="source")
    ax.bar(x + 0.2, [RESULTS.models[n].target_ppl for n in names], 0.4, label="target")
    ax.set_xticks(x, names)
    ax.set(ylabel="perplexity", title="Held-out perplexity")
    ax.legend()
    _stamp(ax)
    _save(fig, "perplexities.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(SWEEP_RANKS, SWEEP_TARGET, "o-", label="target")
    ax.plot(SWEEP_RANKS, SWEEP_SOURCE, "s-", label="source")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rank r", ylabel="perplexity", title="Rank sweep")
    ax.legend()
    _stamp(ax)
    _save(fig, "rank_sweep.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    idx = np.arange(1, 65)
    ax.semilogy(idx, 3.0 * idx**-1.2, label="full fine-tuning ΔW")
    ax.semilogy(idx[:8], 2.5 * idx[:8] ** -0.5, "o-", label="LoRA ΔW (r = 8)")
    ax.set(xlabel="singular value index", ylabel="singular value", title="Spectrum of ΔW")
    ax.legend()
    _stamp(ax)
    _save(fig, "spectrum.png")


if __name__ == "__main__":
    main()
