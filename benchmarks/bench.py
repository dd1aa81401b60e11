"""lora_lab's benchmark suite: is LoRA actually cheaper here, and by how much?

    python benchmarks/bench.py              # the full run (several minutes on 2 CPU cores)
    python benchmarks/bench.py --quick      # a seconds-long smoke run (CI); judges nothing
    python benchmarks/bench.py --json out.json --threads 2

Every figure is a RATIO of two things measured side by side in this one run, so that the
machine's speed cancels out: after warm-up, the contenders run in alternating rounds (A, B,
C, A, B, C, ... with the order rotated each round), each round yields one ratio, and the
table shows the median over rounds and, as its spread, the middle half of them (25th-75th
percentile). In one round each contender is called as many times as fill about half a
second (the same count for all), so a single hiccup of the machine cannot decide a round.
Drift and other processes then slow both sides of a ratio alike, and one disturbed round
moves the median little. Absolute times are in the JSON.

Rows, each with its goal:
  * LoRA training step / full fine-tuning step, same model and batch (goal ≤ 0.75). A frozen
    weight skips one of a linear layer's three matrix products, so the FLOP floor is 2/3 plus
    what costs the same either way (attention, GELU, LayerNorm, ...). On the "cpu" profile's
    model and on a d=384, 4-layer, 7.2M-parameter GPT with batch 32×128. Raced alongside, the
    floor itself: the same model with every weight frozen and only the target layers' biases
    training (variants.py's ``frozen``), the cheapest step any adapter on those layers can have;
    "LoRA / floor" is then what the rank-r adapters themselves cost;
  * lora_lab's step / Hugging Face PEFT's step, same targets and rank (goal ≤ 0.80), plus
    loralib, the plain readable path and the course's layer as contrasts (no goal);
  * inference, no_grad and eval: unmerged LoRA forward / base forward (goal ≤ 1.05), and the
    ``merge_lora`` copy / base (goal 1.00, within ±0.03 of noise);
  * generation, 256 new tokens: recomputing the context / using the KV cache (goal ≥ 3×);
  * peak resident memory (RSS high-water mark, each run in a fresh process) of a LoRA
    training step / a full fine-tuning step on the "course" profile's model at its batch size
    (goal ≤ 0.75), the same for the frozen floor, and, as a contrast, LoRA at a small batch
    where activations weigh less.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing lora_lab

from variants import TARGETS, build_variant  # noqa: E402

from lora_lab import apply_lora_to_model, merge_lora  # noqa: E402
from lora_lab.experiment.config import PROFILES  # noqa: E402
from lora_lab.model import GPT, GPTConfig  # noqa: E402
from lora_lab.runtime import machine_facts  # noqa: E402
from lora_lab.seeding import make_generator, seed_everything  # noqa: E402

DEFAULT_JSON = HERE / "results" / "latest.json"
# A character-level vocabulary (tiny-shakespeare's has 65 symbols). It only sizes the
# embedding and lm_head, about 1% of a step at these widths.
VOCAB_SIZE = 65
RANK, ALPHA = 4, 1.0  # the course's LoRA recipe
LR = 1e-3  # the course's LoRA learning rate; the same for every contender (it does not change the cost)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModelSetting:
    """A model to benchmark and the batch it trains on."""

    label: str
    config: GPTConfig
    batch_size: int
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.config.block_size

    def describe(self) -> str:
        c = self.config
        params = GPT(c).num_parameters() / 1e6
        text = (f"{self.label}: d={c.n_embd}, {c.n_layer} layers, {c.n_head} heads, block {c.block_size}, "
                f"vocab {c.vocab_size}, {params:.2f}M params, batch {self.batch_size}×{c.block_size}")
        return text + (f" [{self.note}]" if self.note else "")


def _profile_setting(name: str) -> ModelSetting:
    """The model of ``lora_lab.experiment.config.PROFILES[name]`` at that profile's batch size."""
    p = PROFILES[name]
    return ModelSetting(f"{name} profile", p.model.gpt_config(VOCAB_SIZE), p.batch_size)


def full_settings() -> dict[str, ModelSetting]:
    return {
        "cpu": _profile_setting("cpu"),
        "7m": ModelSetting("7.2M GPT", GPTConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=4, n_head=6,
                                                  n_embd=384, dropout=0.0), 32),
        "course": _profile_setting("course"),
    }


def quick_settings() -> dict[str, ModelSetting]:
    tiny = GPTConfig(vocab_size=VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    return {key: ModelSetting(f"{key} (quick: tiny)", tiny, 2) for key in ("cpu", "7m", "course")}


@dataclass(frozen=True)
class RunSettings:
    quick: bool
    rounds: int  # timed rounds per comparison (each yields one ratio)
    warmup: int  # untimed calls of each contender first (allocations, optimiser state)
    round_seconds: float  # each contender's share of a round lasts about this long (0: one call)
    gen_tokens: int
    gen_rounds: int
    memory_small_batch: int  # the second, small batch of the memory rows
    models: dict[str, ModelSetting]


def run_settings(quick: bool, rounds: int | None) -> RunSettings:
    if quick:
        # memory_small_batch = the tiny batch itself: the two memory rows then share two processes.
        return RunSettings(True, rounds or 2, 1, 0.0, 8, 1, 2, quick_settings())
    # Half a second per contender per round: a single step of the small model takes ~0.2 s, and
    # rounds of one step measured per-round ratios from 0.55 to 1.22 on this 2-core machine.
    return RunSettings(False, rounds or 7, 2, 0.5, 256, 3, 4, full_settings())


# --------------------------------------------------------------------------- measuring


def machine_description(threads: int) -> dict:
    """lora_lab's machine facts for the threads the benchmarks run with, and the load at the start."""
    return {**machine_facts(), "torch_threads": threads, "load_average_at_start": _load_average()}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _timed(fn: Callable[[], object], calls: int = 1) -> float:
    """Seconds per call of ``fn``, over ``calls`` calls in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@dataclass(frozen=True)
class RaceResult:
    seconds: dict[str, list[float]]  # per contender: seconds per call, one entry per round
    calls_per_round: int


def race(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int, bar: tqdm | None = None,
         round_seconds: float = 0.0) -> RaceResult:
    """Time each contender once per round, in an order rotated every round. Every contender is
    called the same number of times per round: enough that the fastest one's share lasts about
    ``round_seconds`` (one untimed call each sizes it), and at least once."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    calls = 1
    if round_seconds > 0:
        fastest = min(_timed(contenders[name]) for name in names)
        calls = max(1, min(50, round(round_seconds / max(fastest, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    # Autograd graphs are freed by reference counting, so the cyclic collector is not needed
    # while racing; a collection landing inside one contender's timing would bias it.
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(_timed(contenders[name], calls))
            if bar is not None:
                bar.update(1)
    finally:
        gc.enable()
    return RaceResult(times, calls)


def per_round_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """One ratio per round: both sides of it ran back to back."""
    return [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(per_round_ratios(times, numerator, denominator))


def ratio_spread(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """The middle half of the per-round ratios: [25th, 75th percentile] (both the one ratio
    when there is a single round)."""
    ratios = per_round_ratios(times, numerator, denominator)
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive")
    return [quartiles[0], quartiles[2]]


def timed_row(row_id: str, description: str, times: dict, numerator: str, denominator: str,
              goal: float | None = None, goal_kind: str = "<=", tolerance: float = 0.0,
              details: dict | None = None) -> Row:
    """A row whose ratio is the median per-round ratio of two raced contenders, with its spread."""
    return Row(row_id, description, median_ratio(times, numerator, denominator), goal, goal_kind, tolerance,
               details=details or {}, spread=ratio_spread(times, numerator, denominator))


@dataclass
class Row:
    id: str
    description: str
    ratio: float
    goal: float | None = None
    goal_kind: str = "<="  # "<=", ">=", or "≈" (within `tolerance` of `goal`)
    tolerance: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)
    passed: bool | None = None
    spread: list[float] | None = None  # [25th, 75th percentile] of the per-round ratios (timed rows)

    def judge(self, quick: bool) -> None:
        if self.goal is None or quick or not math.isfinite(self.ratio):
            self.passed = None
        elif self.goal_kind == "<=":
            self.passed = self.ratio <= self.goal
        elif self.goal_kind == ">=":
            self.passed = self.ratio >= self.goal
        else:
            self.passed = abs(self.ratio - self.goal) <= self.tolerance

    def goal_text(self) -> str:
        if self.goal is None:
            return "(contrast)"
        if self.goal_kind == "≈":
            return f"{self.goal:.2f} ±{self.tolerance:.2f}"
        return f"{'≤' if self.goal_kind == '<=' else '≥'} {self.goal:.2f}"

    def mark(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]

    def spread_text(self) -> str:
        return "" if self.spread is None else f"{self.spread[0]:.2f}–{self.spread[1]:.2f}"


# --------------------------------------------------------------------------- the benchmarks


def _batch(setting: ModelSetting, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = make_generator(seed)
    shape = (setting.batch_size, setting.config.block_size)
    return (torch.randint(0, setting.config.vocab_size, shape, generator=g),
            torch.randint(0, setting.config.vocab_size, shape, generator=g))


def _base_model(setting: ModelSetting, seed: int = 0) -> GPT:
    seed_everything(seed, deterministic=False)
    return GPT(setting.config)


def training_step(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """One optimiser step as a training loop runs it: zero grads, forward, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()

    return step


def bench_training(key: str, setting: ModelSetting, run: RunSettings, bar: tqdm | None) -> list[Row]:
    """Two races: the contenders with goals (full, lora_lab, PEFT) and the frozen floor, then
    the contrasts; each ratio is taken within one race, so drift between them cannot enter it."""
    base = _base_model(setting)
    idx, targets = _batch(setting, seed=1)

    def contenders(names: Sequence[str]) -> dict[str, Callable[[], None]]:
        return {name: training_step(build_variant(name, base, RANK, ALPHA), idx, targets) for name in names}

    goal_race = race(contenders(("full", "lora_lab", "peft", "frozen")), run.rounds, run.warmup, bar,
                     run.round_seconds)
    contrast_rounds = max(1, (run.rounds + 1) // 2)
    contrast_race = race(contenders(("full", "lora_lab", "loralib", "lora_lab_plain", "course")), contrast_rounds,
                         run.warmup, bar, run.round_seconds)

    def details(result: RaceResult, rounds: int) -> dict:
        return {"model": setting.describe(), "rounds": rounds, "calls_per_round": result.calls_per_round,
                "seconds_per_round": result.seconds,
                "median_seconds": {n: statistics.median(v) for n, v in result.seconds.items()}}

    main, side = details(goal_race, run.rounds), details(contrast_race, contrast_rounds)
    times, contrast = goal_race.seconds, contrast_race.seconds
    where = f"{setting.label}, r={RANK} on {','.join(TARGETS)}"
    rows = [
        timed_row(f"train.{key}.lora_lab_vs_full", f"LoRA step / full fine-tuning step ({where})",
                  times, "lora_lab", "full", 0.75, details=main),
        timed_row(f"train.{key}.lora_lab_vs_peft", f"lora_lab LoRA step / PEFT LoRA step ({setting.label})",
                  times, "lora_lab", "peft", 0.80, details=main),
        timed_row(f"train.{key}.frozen_vs_full",
                  f"frozen floor (weights frozen, biases train) step / full fine-tuning step ({setting.label})",
                  times, "frozen", "full", details=main),
        timed_row(f"train.{key}.lora_lab_vs_frozen", f"LoRA step / frozen floor step ({setting.label})",
                  times, "lora_lab", "frozen", details=main),
        timed_row(f"train.{key}.peft_vs_full", f"PEFT step / full fine-tuning step ({setting.label})",
                  times, "peft", "full", details=main),
        timed_row(f"train.{key}.lora_lab_vs_loralib", f"lora_lab LoRA step / loralib LoRA step ({setting.label})",
                  contrast, "lora_lab", "loralib", details=side),
    ]
    for name, what in (("loralib", "loralib"), ("lora_lab_plain", "plain readable path (LoRALinear, fused=False)"),
                       ("course", "the course's layer (materialises B·Aᵀ)")):
        rows.append(timed_row(f"train.{key}.{name}_vs_full",
                              f"{what} step / full fine-tuning step ({setting.label})",
                              contrast, name, "full", details=side))
    return rows


def bench_inference(key: str, setting: ModelSetting, run: RunSettings, bar: tqdm | None) -> list[Row]:
    base = _base_model(setting).eval()
    lora = apply_lora_to_model(base, RANK, ALPHA, target_modules=list(TARGETS)).eval()
    with torch.no_grad():  # a trained adapter: B ≠ 0 (zeros could only flatter the timing)
        for name, param in lora.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.02, generator=make_generator(2))
    merged = merge_lora(lora).eval()
    idx, _ = _batch(setting, seed=1)

    def forward(model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(idx)
        return call

    # A forward pass is a fraction of a training step, and the goals here sit within a few per
    # cent of 1: three times the rounds.
    rounds = 3 * run.rounds
    result = race({"base": forward(base), "unmerged": forward(lora), "merged": forward(merged)}, rounds,
                  run.warmup, round_seconds=run.round_seconds / 2)
    if bar is not None:
        bar.update(1)
    times = result.seconds
    details = {"model": setting.describe(), "rounds": rounds, "calls_per_round": result.calls_per_round,
               "seconds_per_round": times, "median_seconds": {n: statistics.median(t) for n, t in times.items()}}
    return [
        timed_row(f"infer.{key}.unmerged_vs_base", f"unmerged LoRA forward / base forward, no_grad ({setting.label})",
                  times, "unmerged", "base", 1.05, details=details),
        timed_row(f"infer.{key}.merged_vs_base", f"merge_lora copy forward / base forward, no_grad ({setting.label})",
                  times, "merged", "base", 1.00, "≈", 0.03, details=details),
    ]


def bench_generation(key: str, setting: ModelSetting, run: RunSettings, bar: tqdm | None) -> list[Row]:
    base = _base_model(setting)
    model = apply_lora_to_model(base, RANK, ALPHA, target_modules=list(TARGETS)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)  # one token: the context grows to prompt + new tokens
    n = run.gen_tokens
    calls = {
        "no_cache": lambda: model.generate(prompt, n, temperature=0.0, use_cache=False),
        "cache": lambda: model.generate(prompt, n, temperature=0.0, use_cache=True),
    }
    same = torch.equal(calls["cache"](), calls["no_cache"]())  # doubles as the warm-up
    times = race(calls, run.gen_rounds, 0, bar).seconds  # one generation is seconds long already
    details = {"model": setting.describe(), "new_tokens": n, "prompt_tokens": 1, "rounds": run.gen_rounds,
               "same_tokens_with_and_without_cache": same,
               "seconds_per_round": times, "median_seconds": {k: statistics.median(t) for k, t in times.items()}}
    if 1 + n > setting.config.block_size:
        details["note"] = (f"the context outgrows block_size={setting.config.block_size} after "
                           f"{setting.config.block_size - 1} tokens: past that, the cache is rebuilt at every step")
    what = f"generation, {n} new tokens: recomputing the context / KV cache ({setting.label}, LoRA unmerged)"
    return [timed_row(f"generate.{key}.no_cache_vs_cache", what, times, "no_cache", "cache", 3.0, ">=",
                      details=details)]


# ---- peak memory, each contender in a fresh process (RSS high-water marks never go down)


def _rss_mb() -> tuple[float, float]:
    """(current RSS, RSS high-water mark) of this process, in MiB.

    On Linux from /proc/self/status (VmRSS, VmHWM): ``getrusage``'s ``ru_maxrss`` would be wrong
    here, because Linux carries the parent's high-water mark over into a child across fork and
    exec (measured: a child of a 2.5 GB parent reported 2.5 GB before doing anything). VmHWM
    belongs to the process's own address space, which exec makes new. Elsewhere (macOS) a fresh
    process's ``ru_maxrss`` is its own, and serves for both numbers.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024  # kB
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
        return peak_mb, peak_mb


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: build the model, train ``steps`` steps, report RSS figures."""
    torch.set_num_threads(spec["threads"])
    setting = ModelSetting("child", GPTConfig.from_dict(spec["config"]), spec["batch_size"])
    after_import, _ = _rss_mb()
    base = _base_model(setting)
    model = base if spec["variant"] == "full" else build_variant(spec["variant"], base, RANK, ALPHA)
    del base
    gc.collect()
    idx, targets = _batch(setting, seed=1)
    step = training_step(model, idx, targets)
    for _ in range(spec["steps"]):  # the 2nd step runs with AdamW's state allocated: the steady state
        step()
    _, peak = _rss_mb()
    return {"variant": spec["variant"], "after_import_mb": after_import, "peak_mb": peak}


def _memory_children(specs: dict[tuple[str, int], dict], bar: tqdm | None) -> dict[tuple[str, int], dict]:
    """Run every spec in its own fresh process, all at once (their RSS are their own, and no
    timing is taken here, so sharing the CPU changes nothing but the wait)."""
    this_file = str(Path(__file__).resolve())
    children = {
        key: subprocess.Popen([sys.executable, this_file, "--_memory-child", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, spec in specs.items()
    }
    results = {}
    for key, child in children.items():
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the memory measurement {key} failed (exit {child.returncode}):\n{stderr[-3000:]}")
        results[key] = json.loads(stdout.strip().splitlines()[-1])
        if bar is not None:
            bar.update(1)
    return results


def _memory_comparisons(key: str, setting: ModelSetting, small_batch: int) -> list[tuple]:
    """The memory rows: (batch, variant compared with full fine-tuning, row id, what it is, goal)."""
    return [(setting.batch_size, "lora_lab", f"memory.{key}.lora_lab_vs_full", "LoRA step", 0.75),
            (setting.batch_size, "frozen", f"memory.{key}.frozen_vs_full",
             "frozen floor (weights frozen, biases train)", None),
            (small_batch, "lora_lab", f"memory.{key}.small_batch.lora_lab_vs_full", "LoRA step", None)]


def _memory_processes(comparisons: list[tuple]) -> set[tuple[str, int]]:
    """The (variant, batch) runs the comparisons need, each once: full fine-tuning at every batch."""
    return {(variant, batch) for batch, variant, *_ in comparisons} | {("full", batch) for batch, *_ in comparisons}


def bench_memory(key: str, setting: ModelSetting, small_batch: int, threads: int, bar: tqdm | None) -> list[Row]:
    """Peak RSS of LoRA and of the frozen floor vs full fine-tuning at the profile's batch (the
    goal), and of LoRA at a small batch. LoRA saves the frozen weights' gradients and AdamW
    moments (12 bytes per parameter) but keeps every adapted layer's input for A's gradient,
    which the floor drops; how much that weighs depends on the batch."""
    base_spec = {"config": setting.config.to_dict(), "threads": threads, "steps": 2}
    comparisons = _memory_comparisons(key, setting, small_batch)
    specs = {(variant, batch): {**base_spec, "variant": variant, "batch_size": batch}
             for variant, batch in _memory_processes(comparisons)}
    results = _memory_children(specs, bar)
    rows = []
    for batch, variant, row_id, what, goal in comparisons:
        full, other = results[("full", batch)], results[(variant, batch)]
        # What training adds above the interpreter and torch's libraries (the same in both runs);
        # a tiny model (--quick) may never rise above the import's own high-water mark.
        added_full, added_other = (r["peak_mb"] - r["after_import_mb"] for r in (full, other))
        details = {"model": setting.describe(), "batch": f"{batch}×{setting.config.block_size}",
                   "steps": base_spec["steps"], "full_mb": full, f"{variant}_mb": other,
                   "above_import_ratio": added_other / added_full if added_full > 0 else None}
        rows.append(Row(row_id, f"peak RSS, {what} / full fine-tuning step ({setting.label}, batch "
                                f"{batch}×{setting.config.block_size})", other["peak_mb"] / full["peak_mb"], goal,
                        details=details))
    return rows


# --------------------------------------------------------------------------- main


def run_all(run: RunSettings, threads: int, machine: dict) -> list[Row]:
    """Every row. ``machine["load_average_at_end"]`` is taken after the timed races and before
    the memory runs, whose processes load the machine themselves but time nothing."""
    models = run.models
    n_memory_processes = len(_memory_processes(_memory_comparisons("course", models["course"], run.memory_small_batch)))
    n_races = 2 * (run.rounds + max(1, (run.rounds + 1) // 2)) + 2 + run.gen_rounds + n_memory_processes
    with tqdm(total=n_races, desc="benchmark rounds", disable=run.quick, file=sys.stderr) as bar:
        rows = []
        for key in ("cpu", "7m"):
            rows += bench_training(key, models[key], run, bar)
        for key in ("cpu", "7m"):
            rows += bench_inference(key, models[key], run, bar)
        rows += bench_generation("course", models["course"], run, bar)
        machine["load_average_at_end"] = _load_average()
        rows += bench_memory("course", models["course"], run.memory_small_batch, threads, bar)
    for row in rows:
        row.judge(run.quick)
    return rows


def print_report(machine: dict, run: RunSettings, rows: Sequence[Row]) -> None:
    print("lora_lab benchmark" + ("  (--quick: tiny sizes, nothing judged)" if run.quick else ""))
    print(f"  CPU: {machine['cpu']}, {machine['logical_cores']} logical cores; torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; Python {machine['python']}")
    print(f"  load average at start: {machine['load_average_at_start']}, at the end of the timing: "
          f"{machine.get('load_average_at_end')} (other processes slow both sides of a ratio, but add noise)")
    if machine["busy"]:
        print(f"  WARNING: the machine was busy (more runnable processes than its {machine['logical_cores']} cores): "
              "expect noisy ratios, especially with several threads; rerun on a quiet machine, or with --threads 1")
    for setting in run.models.values():
        print(f"  model {setting.describe()}")
    print(f"  medians of {run.rounds} alternating rounds after {run.warmup} warm-up calls each "
          f"(generation: {run.gen_rounds} rounds); spread: the middle half of the per-round ratios\n")
    width = max(len(r.description) for r in rows)
    print(f"{'measurement':<{width}}  {'ratio':>7}  {'spread':>9}  {'goal':>11}  mark")
    for row in rows:
        print(f"{row.description:<{width}}  {row.ratio:7.3f}  {row.spread_text():>9}  {row.goal_text():>11}  "
              f"{row.mark()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run on tiny sizes; judges nothing")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write results (default {DEFAULT_JSON.relative_to(HERE.parent)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores; 1 with --quick, where thread start-up would dominate)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 7; quick 2)")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else (os.cpu_count() or 1)
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--threads and --rounds must be positive integers")
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0

    torch.set_num_threads(args.threads)
    run = run_settings(args.quick, args.rounds)
    machine = machine_description(torch.get_num_threads())
    rows = run_all(run, torch.get_num_threads(), machine)
    loads = [la[0] for la in (machine["load_average_at_start"], machine["load_average_at_end"]) if la]
    machine["busy"] = bool(loads) and max(loads) > (machine["logical_cores"] or 1)
    print_report(machine, run, rows)

    payload = {
        "quick": run.quick,
        "machine": machine,
        "settings": {"rounds": run.rounds, "warmup": run.warmup, "round_seconds": run.round_seconds,
                     "generation_tokens": run.gen_tokens,
                     "generation_rounds": run.gen_rounds, "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
                     "models": {k: {"description": s.describe(), "config": s.config.to_dict(),
                                    "batch_size": s.batch_size} for k, s in run.models.items()}},
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)  # atomic: a reader never sees half a file
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
