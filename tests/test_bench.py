"""The benchmark suite runs end to end: ``benchmarks/bench.py --quick`` in a fresh process.

Only that it runs and reports every row with a finite ratio is checked — a smoke test on tiny
sizes, where timings mean nothing, so no timing is asserted (``--quick`` judges nothing).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"

EXPECTED_ROWS = {
    *(f"train.{model}.{name}" for model in ("cpu", "7m") for name in (
        "lora_lab_vs_full", "lora_lab_vs_peft", "lora_lab_vs_loralib", "peft_vs_full", "loralib_vs_full",
        "lora_lab_plain_vs_full", "course_vs_full", "frozen_vs_full", "lora_lab_vs_frozen")),
    *(f"infer.{model}.{name}" for model in ("cpu", "7m") for name in ("unmerged_vs_base", "merged_vs_base")),
    "generate.course.no_cache_vs_cache",
    "memory.course.lora_lab_vs_full",
    "memory.course.frozen_vs_full",
    "memory.course.small_batch.lora_lab_vs_full",
}


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ is not part of this checkout")
def test_quick_benchmark_writes_every_row(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("loralib")
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["quick"] is True
    assert {"cpu", "logical_cores", "torch", "torch_threads"} <= result["machine"].keys()
    rows = {row["id"]: row for row in result["rows"]}
    assert rows.keys() == EXPECTED_ROWS
    for row in rows.values():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["passed"] is None  # --quick judges nothing
        if not row["id"].startswith("memory."):  # timed rows: the middle half of the per-round ratios
            low, high = row["spread"]
            assert low <= row["ratio"] <= high, row
    assert rows["generate.course.no_cache_vs_cache"]["details"]["same_tokens_with_and_without_cache"] is True
    for row_id in EXPECTED_ROWS:  # the table printed every row
        assert rows[row_id]["description"] in done.stdout


def _load_bench_module(name: str):
    import importlib.util

    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_lora_lab_{name}", BENCH.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ is not part of this checkout")
def test_frozen_floor_trains_only_the_target_biases() -> None:
    from lora_lab.model import GPT, GPTConfig

    variants = _load_bench_module("variants")
    base = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    floor = variants.build_variant("frozen", base)
    trained = sorted(name for name, p in floor.named_parameters() if p.requires_grad)
    layers = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
    assert trained == sorted(f"blocks.{i}.{layer}.bias" for i in range(2) for layer in layers)
    assert all(p.requires_grad for p in base.parameters())  # the base model was copied, not changed
    with pytest.raises(ValueError, match="bias=False"):
        variants.build_variant("frozen", GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2,
                                                       n_embd=16, bias=False)))


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ is not part of this checkout")
def test_race_calls_each_contender_equally_and_spread_brackets_the_median() -> None:
    bench = _load_bench_module("bench")
    calls = {"a": 0, "b": 0}

    def contender(name: str):
        def call() -> None:
            calls[name] += 1
        return call

    result = bench.race({"a": contender("a"), "b": contender("b")}, rounds=5, warmup=1, round_seconds=1e-4)
    per_round = result.calls_per_round
    assert 1 <= per_round <= 50
    assert calls["a"] == calls["b"] == 1 + 1 + 5 * per_round  # warm-up, sizing call, the rounds
    assert [len(result.seconds[name]) for name in ("a", "b")] == [5, 5]
    ratios = {"x": [1.0, 2.0, 3.0, 4.0, 5.0], "y": [1.0] * 5}
    assert bench.median_ratio(ratios, "x", "y") == 3.0
    assert bench.ratio_spread(ratios, "x", "y") == [2.0, 4.0]
    assert bench.ratio_spread({"x": [2.0], "y": [1.0]}, "x", "y") == [2.0, 2.0]
