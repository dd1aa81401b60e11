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
        "lora_lab_plain_vs_full", "seed_vs_full")),
    *(f"infer.{model}.{name}" for model in ("cpu", "7m") for name in ("unmerged_vs_base", "merged_vs_base")),
    "generate.seed.no_cache_vs_cache",
    "memory.seed.lora_lab_vs_full",
    "memory.seed.small_batch.lora_lab_vs_full",
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
    assert rows["generate.seed.no_cache_vs_cache"]["details"]["same_tokens_with_and_without_cache"] is True
    for row_id in EXPECTED_ROWS:  # the table printed every row
        assert rows[row_id]["description"] in done.stdout
