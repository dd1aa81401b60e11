"""README's measured numbers are those of the committed measurement files, printed the way the
package prints them: a re-run that changes a file without the README (or the reverse) fails here."""

from __future__ import annotations

import json
from pathlib import Path

from lora_lab.experiment.report import format_table
from lora_lab.experiment.results import RunResults
from lora_lab.experiment.seeds import Spread

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_headline_table_is_paper_data_results_json() -> None:
    results = RunResults.from_json((ROOT / "paper" / "data" / "results.json").read_text(encoding="utf-8"))
    assert results.seeds == [0, 1, 2]
    assert format_table(results) in README


def test_the_tiny_shakespeare_tables_are_paper_tinyshakespeare_json() -> None:
    data = json.loads((ROOT / "paper" / "tinyshakespeare.json").read_text(encoding="utf-8"))
    settings = ("last_step", "best_checkpoint", "lr_picked_here")
    assert data["seeds"] == [0, 1, 2] and all(len(data[s]["across_seeds"]["base"]["target_ppl"]) == 3 for s in settings)
    assert [data[s]["keep_best"] for s in settings] == [False, True, True]
    section = README[README.index("### Real text: Tiny Shakespeare"):]
    tables = {"target_ppl": section[section.index("Target perplexity") : section.index("Source perplexity")],
              "source_ppl": section[section.index("Source perplexity") : section.index("\n- ")]}  # fmt: skip
    for metric, table in tables.items():
        for model in data["last_step"]["across_seeds"]:
            cells = [Spread.of(data[s]["across_seeds"][model][metric]).format() for s in settings]
            row = f"| {model} | {' | '.join(cells)} |"
            assert row in table, f"README's {metric} table lacks the row {row}"
