"""The GPU section of lora_lab's benchmarks: LoRA, full fine-tuning and PEFT on a CUDA GPU.

    python benchmarks/gpu.py                          # on a CUDA GPU: about 3 minutes expected on an H100
    python benchmarks/gpu.py --quick --device cpu     # the same code on tiny models on a CPU; judges nothing

Without a CUDA GPU (and without ``--device cpu``) it says so and exits without measuring.
Every figure is a ratio of two contenders raced side by side in alternating rounds (bench.py's
``race``: medians of per-round ratios, spread the middle half), each training step ending with a
``torch.cuda.synchronize()`` so that a round times the GPU's work, not the launch queue. The step
is the training loop's own (:mod:`lora_lab.training.compute`: bf16 autocast or fp32, fused AdamW on
CUDA, optionally ``torch.compile``). Rows, on the course profile's 8.2M model (batch 64×256) and on a
~100M-parameter GPT (d=768, 14 layers, batch 16×512), LoRA r=4 on every projection as in bench.py:

* step time, bf16 autocast: LoRA / full fine-tuning (goal ≤ 0.70 on the ~100M GPT), LoRA / PEFT
  (goal ≤ 0.85 there), PEFT / full, and the frozen floor / full (bench.py's floor); the same in fp32;
* bf16 step / fp32 step for full fine-tuning and LoRA: whether ``compute.precision=auto`` (bf16 on
  CUDA) is the right default;
* peak GPU memory (``torch.cuda.max_memory_allocated`` over two steps, each contender alone):
  LoRA / full fine-tuning (goal ≤ 0.60 on the ~100M GPT), PEFT / full, floor / full, in bf16, and
  LoRA / full in fp32;
* ``torch.compile``d step / eager step, full fine-tuning and LoRA, bf16, course model (whether
  ``compute.compile`` should be on for GPU runs), with the compile time;
* generation of 256 tokens, recomputing the context / the KV cache (goal ≥ 3×), course model.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing lora_lab
sys.path.insert(0, str(HERE))

from bench import ALPHA, LR, RANK, ModelSetting, Row, race, timed_row  # noqa: E402
from variants import TARGETS, build_variant  # noqa: E402

from lora_lab import apply_lora_to_model  # noqa: E402
from lora_lab.experiment.config import PROFILES  # noqa: E402
from lora_lab.model import GPT, GPTConfig  # noqa: E402
from lora_lab.runtime import machine_facts  # noqa: E402
from lora_lab.seeding import make_generator, seed_everything  # noqa: E402
from lora_lab.training.compute import ResolvedCompute, make_adamw  # noqa: E402

DEFAULT_JSON = HERE / "results" / "gpu.json"
VOCAB_SIZE = 65
# PEFT's rows need Hugging Face PEFT; without it they are left out (and the run says so).
HAVE_PEFT = importlib.util.find_spec("peft") is not None
TRAIN_VARIANTS = ("full", "lora_lab", "frozen") + (("peft",) if HAVE_PEFT else ())
GOALS = {  # (row suffix, model) -> goal; the goals are for the ~100M GPT in the GPU's default path
    ("bf16.lora_lab_vs_full", "100m"): 0.70,
    ("bf16.lora_lab_vs_peft", "100m"): 0.85,
    ("memory.bf16.lora_lab_vs_full", "100m"): 0.60,
}


def settings(quick: bool) -> dict[str, ModelSetting]:
    if quick:
        tiny = GPTConfig(VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=32)
        return {"course": ModelSetting("course (quick: tiny)", tiny, 2), "100m": ModelSetting("100m (quick: tiny)",
                                                                                             tiny, 2)}  # fmt: skip
    course = PROFILES["course"]
    return {
        "course": ModelSetting("course profile", course.model.gpt_config(VOCAB_SIZE), course.batch_size),
        "100m": ModelSetting("~100M GPT", GPTConfig(VOCAB_SIZE, block_size=512, n_layer=14, n_head=12, n_embd=768), 16),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], compute: ResolvedCompute
               ) -> Callable[[], None]:  # fmt: skip
    """One step of lora_lab's training loop (autocast, fused AdamW on CUDA, optional compile), synchronised."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw([{"params": params}], LR, compute.device)
    step_model = compute.compiled(model.train())
    idx, targets = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with compute.autocast():
            _, loss = step_model(idx, targets)
        loss.backward()
        optimizer.step()
        _sync(compute.device)

    return step


def _batch(setting: ModelSetting, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = make_generator(1)
    shape = (setting.batch_size, setting.config.block_size)
    return tuple(torch.randint(0, VOCAB_SIZE, shape, generator=g).to(device) for _ in range(2))


def _base(setting: ModelSetting) -> GPT:
    seed_everything(0, deterministic=False)
    return GPT(setting.config)


def _row(row_id: str, key: str, description: str, times: dict, a: str, b: str, details: dict) -> Row:
    suffix = row_id.split(".", 2)[-1]
    return timed_row(row_id, description, times, a, b, GOALS.get((suffix, key)), details=details)


def bench_steps(key: str, setting: ModelSetting, device: torch.device, rounds: int, round_seconds: float) -> list[Row]:
    """One race of every variant in bf16 and fp32, so that every ratio below is taken within it."""
    base, batch = _base(setting), _batch(setting, device)
    contenders = {}
    for precision in ("bf16", "fp32"):
        compute = ResolvedCompute(precision, False, device)
        for variant in TRAIN_VARIANTS:
            contenders[f"{variant}_{precision}"] = train_step(build_variant(variant, base, RANK, ALPHA).to(device),
                                                              batch, compute)  # fmt: skip
    result = race(contenders, rounds, warmup=2, round_seconds=round_seconds)
    times = result.seconds
    details = {"model": setting.describe(), "rounds": rounds, "calls_per_round": result.calls_per_round,
               "median_seconds": {n: statistics.median(t) for n, t in times.items()}}
    pairs = [("lora_lab_vs_full", "LoRA step / full fine-tuning step", "lora_lab", "full"),
             ("frozen_vs_full", "frozen floor step / full fine-tuning step", "frozen", "full")]
    if HAVE_PEFT:
        pairs += [("lora_lab_vs_peft", "lora_lab LoRA step / PEFT LoRA step", "lora_lab", "peft"),
                  ("peft_vs_full", "PEFT step / full fine-tuning step", "peft", "full")]
    label = setting.label
    rows = [_row(f"gpu.{key}.{p}.{suffix}", key, f"{what}, {p} ({label})", times, f"{a}_{p}", f"{b}_{p}", details)
            for p in ("bf16", "fp32") for suffix, what, a, b in pairs]
    for variant in ("full", "lora_lab"):
        rows.append(_row(f"gpu.{key}.bf16_vs_fp32.{variant}", key, f"{variant} step, bf16 autocast / fp32 ({label})",
                         times, f"{variant}_bf16", f"{variant}_fp32", details))  # fmt: skip
    return rows


def bench_memory(key: str, setting: ModelSetting, device: torch.device) -> list[Row]:
    """Peak allocated GPU memory over two steps (the second with AdamW's state), each contender alone."""
    if device.type != "cuda":
        print(f"  memory rows of {key}: skipped, they read CUDA's allocator (device is {device.type})", file=sys.stderr)
        return []
    peaks: dict[str, int] = {}
    base = _base(setting)  # on the CPU: only each contender's copy is on the GPU
    for precision, variants in (("bf16", TRAIN_VARIANTS), ("fp32", ("full", "lora_lab"))):
        for variant in variants:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            model = build_variant(variant, base, RANK, ALPHA).to(device)
            step = train_step(model, _batch(setting, device), ResolvedCompute(precision, False, device))
            for _ in range(2):
                step()
            peaks[f"{variant}_{precision}"] = torch.cuda.max_memory_allocated(device)
            del model, step
    details = {"model": setting.describe(), "peak_bytes": peaks}
    rows = []
    for name, p in (("lora_lab", "bf16"), ("peft", "bf16"), ("frozen", "bf16"), ("lora_lab", "fp32")):
        if f"{name}_{p}" not in peaks:  # PEFT absent
            continue
        rows.append(Row(f"gpu.{key}.memory.{p}.{name}_vs_full", f"peak GPU memory, {name} / full fine-tuning, {p} "
                        f"({setting.label})", peaks[f"{name}_{p}"] / peaks[f"full_{p}"],
                        GOALS.get((f"memory.{p}.{name}_vs_full", key)), details=details))  # fmt: skip
    return rows


def bench_compile(key: str, setting: ModelSetting, device: torch.device, rounds: int, round_seconds: float
                  ) -> list[Row]:  # fmt: skip
    if device.type != "cuda":
        print("  torch.compile rows: skipped on CPU (one compile of even a tiny GPT took minutes on the project's "
              "2-core machine)", file=sys.stderr)  # fmt: skip
        return []
    base, batch = _base(setting), _batch(setting, device)
    contenders, compile_seconds = {}, {}
    for variant in ("full", "lora_lab"):
        for compiled in (False, True):
            name = f"{variant}_{'compiled' if compiled else 'eager'}"
            step = train_step(build_variant(variant, base, RANK, ALPHA).to(device), batch,
                              ResolvedCompute("bf16", compiled, device))  # fmt: skip
            start = time.perf_counter()
            step()  # the first call compiles
            compile_seconds[name] = time.perf_counter() - start
            contenders[name] = step
    result = race(contenders, rounds, warmup=2, round_seconds=round_seconds)
    details = {"model": setting.describe(), "first_call_seconds": compile_seconds,
               "median_seconds": {n: statistics.median(t) for n, t in result.seconds.items()}}
    return [_row(f"gpu.{key}.compile.{v}", key, f"torch.compile'd {v} step / eager step, bf16 ({setting.label})",
                 result.seconds, f"{v}_compiled", f"{v}_eager", details) for v in ("full", "lora_lab")]  # fmt: skip


def bench_generation(key: str, setting: ModelSetting, device: torch.device, tokens: int, rounds: int) -> list[Row]:
    model = apply_lora_to_model(_base(setting), RANK, ALPHA, target_modules=list(TARGETS)).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def generate(use_cache: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            out = model.generate(prompt, tokens, temperature=0.0, use_cache=use_cache)
            _sync(device)
            return out
        return call

    calls = {"no_cache": generate(False), "cache": generate(True)}
    same = torch.equal(calls["cache"](), calls["no_cache"]())
    times = race(calls, rounds, 0).seconds
    details = {"model": setting.describe(), "new_tokens": tokens, "same_tokens_with_and_without_cache": same,
               "median_seconds": {k: statistics.median(t) for k, t in times.items()}}
    return [timed_row(f"gpu.{key}.generate.no_cache_vs_cache", f"generation, {tokens} new tokens: recomputing the "
                      f"context / KV cache ({setting.label})", times, "no_cache", "cache", 3.0, ">=", details=details)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few rounds: a smoke run; judges nothing")
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (for --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per race (default 5; quick 2)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the rows")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped, PyTorch sees no CUDA GPU here (run it on a GPU machine; "
              "--quick --device cpu runs the same code on tiny models on a CPU)")
        return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU here")
    if not HAVE_PEFT:
        print("  Hugging Face PEFT is not installed: its rows are left out (pip install peft)", file=sys.stderr)
    # A GPU's step times vary far less than the shared CPU's: 5 rounds of 0.3 s per contender.
    rounds = args.rounds or (2 if args.quick else 5)
    round_seconds = 0.0 if args.quick else 0.3
    models = settings(args.quick)
    facts = machine_facts()
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    rows: list[Row] = []

    def save() -> None:  # after every section: a run cut short keeps what it measured
        payload = {"quick": args.quick, "device": str(device), "machine": facts, "rounds": rounds,
                   "rows": [dataclasses.asdict(row) for row in rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, args.json)

    sections = [(f"steps {key}", lambda k=key: bench_steps(k, models[k], device, rounds, round_seconds))
                for key in models]  # fmt: skip
    sections += [(f"memory {key}", lambda k=key: bench_memory(k, models[k], device)) for key in models]
    sections.append(("generation course", lambda: bench_generation("course", models["course"], device,
                                                                   8 if args.quick else 256, 1 if args.quick else 3)))
    if not args.no_compile:
        sections.append(("compile course", lambda: bench_compile("course", models["course"], device, rounds,
                                                                 round_seconds)))  # fmt: skip
    failed = []
    for name, section in sections:
        start = time.perf_counter()
        try:
            rows += section()
        except Exception as error:  # noqa: BLE001 -- one broken section (a compile, say) must not lose the others
            failed.append(name)
            print(f"  {name}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    for row in rows:
        row.judge(args.quick)
    save()
    print(f"lora_lab GPU benchmark on {facts.get('gpu', device.type)}" + ("  (--quick: tiny, nothing judged)"
                                                                          if args.quick else ""))  # fmt: skip
    for setting in models.values():
        print(f"  model {setting.describe()}")
    width = max((len(r.description) for r in rows), default=12)
    print(f"{'measurement':<{width}}  {'ratio':>7}  {'spread':>9}  {'goal':>11}  mark")
    for row in rows:
        print(f"{row.description:<{width}}  {row.ratio:7.3f}  {row.spread_text():>9}  {row.goal_text():>11}  "
              f"{row.mark()}")
    print(f"\nresults written to {args.json}")
    if failed:
        print(f"sections that failed (their error above): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
