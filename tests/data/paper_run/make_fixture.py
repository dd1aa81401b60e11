"""Write the TEST FIXTURE run directory used by tests/test_paper.py.

It imitates what ``lora-lab run`` writes (``results.json``, ``sweep.json`` and the PNG
figures) and, as ``bench.json``, what the benchmark suite writes (``benchmarks/results/latest.json``),
so that the companion reading (``paper/``) can be built and tested without running any
experiment. Every number here is made up — plausible for the cpu profile's
0.8M-parameter character GPT on the built-in corpus, but not measured — and ``results.json``
says so in its ``note`` field, which the PDF prints on its title page. Regenerate with::

    .venv/bin/python tests/data/paper_run/make_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
NOTE = (
    "TEST FIXTURE for tests/test_paper.py: hand-made, plausible numbers, NOT measured. "
    "Run make pdf to build the reading from a real lora-lab run."
)

# The cpu profile's GPT (4 blocks, d_model = 128, 34 characters) has 818,432 parameters; LoRA on
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
) -> dict:
    """A results.json model entry; ``rank=None`` means every parameter is trained."""
    trainable = BASE_PARAMS if rank is None else rank * PARAMS_PER_RANK
    return {
        "target_ppl": target,
        "source_ppl": source,
        "trainable_params": trainable,
        "total_params": BASE_PARAMS + (0 if rank is None else trainable),
        "train_seconds": seconds,
        "artifact_bytes": artifact,
        "valid_target_rate": valid,
        "samples": [p + s for p, s in zip(PROMPTS, samples, strict=True)],
    }


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
    "lora_seed": _model(
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
    "lora": _model(
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


def _history(steps: int, seconds: float, start: float, end: float) -> dict:
    """A short, made-up training history in lora_lab.train.TrainResult.to_dict()'s layout."""
    points = np.linspace(0, steps, 6).astype(int)
    losses = end + (start - end) * np.exp(-points / (steps / 4))
    return {
        "train_loss": [round(float(v), 4) for v in losses],
        "val_loss": [[int(s), round(float(v), 4)] for s, v in zip(points, losses, strict=True)],
        "seconds": seconds,
        "steps": steps,
    }


def _checks(models: dict) -> dict:
    base, lora, full = models["base"], models["lora"], models["full"]
    gap = base["target_ppl"] - full["target_ppl"]
    return {
        "lora_beats_base_on_target": lora["target_ppl"] < base["target_ppl"],
        "lora_within_10pct_of_full": lora["target_ppl"] <= 1.10 * full["target_ppl"],
        "lora_closes_70pct_of_gap": gap > 0 and base["target_ppl"] - lora["target_ppl"] >= 0.70 * gap,
        "lora_forgets_less_than_full": lora["source_ppl"] < full["source_ppl"],
        "lora_samples_80pct_valid": lora["valid_target_rate"] >= 0.80,
        "no_model_below_floor": all(
            m["target_ppl"] >= FLOORS["target"] and m["source_ppl"] >= FLOORS["source"] for m in models.values()
        ),
    }


RESULTS = {
    "note": NOTE,
    "corpus": "builtin",
    "profile": "cpu",
    "entropy_floor_ppl": FLOORS,
    "models": MODELS,
    "recipes": {
        "lora_seed": {"name": "lora_seed", "rank": 4, "alpha": 1.0, "lr": 0.001, "target_modules": None},
        "lora": {"name": "lora", "rank": 8, "alpha": 16.0, "lr": 0.003, "target_modules": None},
    },
    "profile_settings": {
        "name": "cpu",
        "block_size": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "dropout": 0.0,
        "builtin_chars": None,
        "batch_size": 32,
        "pretrain_epochs": 4.0,
        "pretrain_lr": 0.003,
        "lora_rank": 4,
        "lora_alpha": 1.0,
        "lora_lr": 0.001,
        "finetune_epochs": 5.0,
        "tuned_rank": 8,
        "tuned_alpha": 16.0,
        "tuned_lr": 0.003,
        "full_lr": 0.001,
        "sample_tokens": 200,
        "seed": 0,
    },
    "corpus_sha256": "0" * 64,
    "split_sizes": {"source_train": 288_000, "source_val": 32_000, "target_train": 72_000, "target_val": 8_000},
    "machine": "x86_64 · 2 CPUs · torch 2.13.0 · 2 threads (fixture)",
    "histories": {
        "base": _history(2400, 412.7, 3.4, 0.56),
        "lora_seed": _history(600, 58.9, 0.88, 0.79),
        "lora": _history(600, 61.3, 0.88, 0.515),
        "full": _history(600, 74.8, 0.88, 0.494),
    },
}
RESULTS["checks"] = _checks(MODELS)

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
    "seed": "seed profile: d=408, 4 layers, 6 heads, block 256, vocab 34, 8.17M params, batch 64×256",
}
BENCH_RATIOS = {
    "train.cpu.lora_lab_vs_full": 0.8812,
    "train.cpu.lora_lab_plain_vs_full": 1.1234,
    "train.cpu.peft_vs_full": 1.2755,
    "train.cpu.loralib_vs_full": 1.2199,
    "train.cpu.seed_vs_full": 1.5521,
    "train.cpu.frozen_vs_full": 0.7321,
    "train.7m.lora_lab_vs_full": 0.7466,
    "train.7m.lora_lab_plain_vs_full": 1.0143,
    "train.7m.peft_vs_full": 0.9588,
    "train.7m.loralib_vs_full": 1.0311,
    "train.7m.seed_vs_full": 1.6543,
    "train.7m.frozen_vs_full": 0.6987,
    "infer.7m.unmerged_vs_base": 1.0234,
    "infer.7m.merged_vs_base": 0.9912,
    "memory.seed.lora_lab_vs_full": 0.9611,
    "memory.seed.frozen_vs_full": 0.7812,
    "memory.seed.small_batch.lora_lab_vs_full": 0.8133,
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
    (HERE / "results.json").write_text(json.dumps(RESULTS, indent=2, ensure_ascii=False) + "\n")
    (HERE / "sweep.json").write_text(json.dumps(SWEEP, indent=2) + "\n")
    (HERE / "bench.json").write_text(json.dumps(BENCH, indent=2, ensure_ascii=False) + "\n")

    # Two panels like lora_lab.plots.plot_loss_curves: pretraining left, fine-tuning right.
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, names in ((left, ("base",)), (right, ("lora_seed", "lora", "full"))):
        for name in names:
            steps, losses = zip(*RESULTS["histories"][name]["val_loss"], strict=True)
            ax.plot(steps, losses, "o-", label=name)
        ax.set(xlabel="step", ylabel="validation loss (nats/char)")
        ax.legend()
        _stamp(ax)
    left.axhline(np.log(FLOORS["source"]), ls="--", color="k", lw=1)
    right.axhline(np.log(FLOORS["target"]), ls="--", color="k", lw=1)
    _save(fig, "loss_curves.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(RESULTS["models"])
    x = np.arange(len(names))
    ax.bar(x - 0.2, [RESULTS["models"][n]["source_ppl"] for n in names], 0.4, label="source")
    ax.bar(x + 0.2, [RESULTS["models"][n]["target_ppl"] for n in names], 0.4, label="target")
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
