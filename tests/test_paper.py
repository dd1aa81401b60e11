"""The companion reading (paper/) builds into a valid PDF whose numbers come from results.json
and, for step times and memory, from the benchmark suite's results (bench.json).

Every build here reads the TEST FIXTURE run folder tests/data/paper_run (made-up numbers,
see its make_fixture.py; its bench.json stands in for benchmarks/results/latest.json) and
writes into pytest's temporary folders: the committed snapshot paper/data/, the benchmark
results and the root comentario_LoRA.pdf are never read for a build or touched.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pypdf
import pytest

from lora_lab.experiment.seeds import Spread

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "paper_run"
FIXTURE_BENCH = FIXTURE / "bench.json"
BUILD_SCRIPT = REPO / "paper" / "build.py"
SECTIONS = (
    "Introduction",
    "The method",
    "Why low rank works",
    "Initialisation and scaling",
    "Cost analysis",
    "The experiment",
    "The LoRA family, measured",
    "Where it stops",
    "Limitations",
    "Appendix: the CPU benchmarks in detail",
    "Answers to the review questions",
    "Resumo em português",
    "Glossário inglês–português",
    "References",
)
EPOCH = "1767225600"  # 2026-01-01T00:00:00Z, as SOURCE_DATE_EPOCH: fixes the title-page date and PDF timestamps
DATE = "1 January 2026"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("paper_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


paper_build = _load_build_module()


def _text(pdf: Path) -> str:
    """The PDF's text, NFKC-normalised so that ligatures (ﬁ) read as plain letters, and the no-break
    hyphens of table cells ("fine‑tuning", which NFKC makes U+2010) as plain hyphens."""
    reader = pypdf.PdfReader(pdf)
    text = unicodedata.normalize("NFKC", "\n".join(page.extract_text() for page in reader.pages))
    return text.replace("\u2010", "-")


def _squash(text: str) -> str:
    """Text without any white space: how pypdf spaces math (``s = α/r`` or ``s=α/r``) depends on
    where a line or page happens to break, which no test should depend on."""
    return "".join(text.split())


def _snapshot_and_previous_pdf(built, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of the built snapshot, a stand-in for a previous PDF, and the snapshot's state: what
    a failing build must leave exactly as it was."""
    data = tmp_path / "data"
    shutil.copytree(built["dir"] / "data", data)
    out = tmp_path / "out.pdf"
    out.write_bytes(b"the previous PDF")
    return data, out, _state(data)


def _state(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of a file or of every file under a folder; {} when absent."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _fixture_results() -> dict:
    return json.loads((FIXTURE / "results.json").read_text(encoding="utf-8"))


def _fixture_bench() -> dict:
    return json.loads(FIXTURE_BENCH.read_text(encoding="utf-8"))


def _bench_ratio(row_id: str) -> float:
    return next(row["ratio"] for row in _fixture_bench()["rows"] if row["id"] == row_id)


def _copy_fixture(dest: Path) -> Path:
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("*.py"))
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build from the fixture; also records the repository's own outputs before it."""
    protected = {**_state(REPO / "comentario_LoRA.pdf"), **_state(REPO / "paper" / "data")}
    tmp = tmp_path_factory.mktemp("paper")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SOURCE_DATE_EPOCH", EPOCH)
        out = paper_build.build(FIXTURE, data_dir=tmp / "data", out=tmp / "comentario_LoRA.pdf", bench=FIXTURE_BENCH)
    return {"dir": tmp, "pdf": out, "text": _text(out), "protected": protected}


def test_builds_a_valid_pdf_of_14_to_26_pages(built):
    assert built["pdf"] == (built["dir"] / "comentario_LoRA.pdf").resolve()
    reader = pypdf.PdfReader(built["pdf"])
    assert 14 <= len(reader.pages) <= 26, f"{len(reader.pages)} pages"
    assert reader.metadata.title == "Low-Rank Adaptation, Explained and Measured"
    assert "Companion reading to the lora_lab notebooks" in built["text"]
    assert DATE in built["text"]


@pytest.mark.parametrize("title", SECTIONS)
def test_has_the_expected_sections(built, title):
    assert title in built["text"]


def test_has_the_errata_box_and_the_fixture_note(built):
    text = built["text"]
    assert "Errata: what the course gets wrong" in text
    # The fixture marks itself; the PDF must print that on its title page.
    assert "TEST FIXTURE" in text.split("Contents")[0]


def test_numbers_come_from_results_json(built):
    models = _fixture_results()["models"]
    text = built["text"]
    for name in ("base", "lora", "full"):
        assert f"{models[name]['target_ppl']:.3f}" in text, name
        assert f"{models[name]['source_ppl']:.3f}" in text, name
    assert f"{models['lora']['trainable_params']:,}" in text
    assert f"{models['lora_course']['trainable_params']:,}" in text
    assert f"LoRA (course) {models['lora_course']['target_ppl']:.3f}" in " ".join(text.split())


def test_the_course_is_named_the_course_and_seed_means_a_random_seed(built):
    """The course module this project grew from is "the course"; "seed" is only ever a random seed."""
    flat = " ".join(built["text"].split())
    assert "from here on, the course" in flat
    assert "with LoRA using the course’s recipe" in flat
    assert _squash("The course’s recipe uses r = 4") in _squash(flat)  # the scaling chapter reads recipes.lora_course
    assert "the course’s recipe only" in flat  # the experiment chapter reads models.lora_course
    uses = {word for word in re.findall(r"(\w+) seeds?\b", flat, flags=re.IGNORECASE) if not word.isdigit()}
    assert uses == {"Random", "random", "one", "between", "several", "single", "every", "the", "over", "first"}, uses


def test_the_portuguese_part_summarises_the_run_in_portuguese(built):
    """The course's students read Portuguese: a Resumo with the run's numbers, written the Brazilian
    way (decimal comma, thousands point), and a glossary."""
    flat = " ".join(built["text"].split())
    resumo = flat[flat.rindex("Resumo em português") :]  # the chapter, not its line in the contents
    models = _fixture_results()["models"]
    assert "A receita de LoRA ajustada treinou" in resumo
    for name in ("lora", "full"):
        english = f"{models[name]['target_ppl']:.3f}"
        assert english.replace(".", ",") in resumo and english not in resumo, name
    total = models["base"]["total_params"]
    assert total >= 1000 and f"{total:,}".replace(",", ".") + " parâmetros" in resumo
    terms = (("rank", "posto"), ("perplexity", "perplexidade"), ("learning rate", "taxa de aprendizado"))
    for english, portuguese in terms:
        assert f"{english} {portuguese}" in resumo, english


def test_references_are_in_alphabetical_order(built):
    """The reference list is sorted by the first author's family name as printed ("Ben Zaken"
    under B, not after Vaswani)."""
    references = built["text"][built["text"].rindex("References") :]
    firsts = re.findall(r"^([A-Z][\w .-]*?), (?:[A-Z]\.)+.*?\((\d{4})\)", references, flags=re.MULTILINE)
    names = [name for name, _ in firsts]
    assert len(names) >= 15 and "Ben Zaken" in names, names
    assert names == sorted(names, key=str.casefold), names


def test_every_chapter_has_review_questions_answered_in_the_appendix(built):
    flat = " ".join(built["text"].split())
    for chapter in ("the method", "why low rank works", "initialisation and scaling", "cost", "the experiment"):
        assert f"Review questions: {chapter} (answers in Section" in flat, chapter
    answers = flat[flat.index("Answers to the review questions") :]
    assert "6,144numbers" in _squash(answers) and "131,072inW" in _squash(answers) and "12.5%" in answers


def test_the_benchmark_appendix_reports_missed_goals(built):
    flat = " ".join(built["text"].split())
    appendix = flat[flat.index("Appendix: the CPU benchmarks in detail") :]
    rows = _fixture_bench()["rows"]
    missed = [row for row in rows if row.get("passed") is False]
    judged = [row for row in rows if row.get("passed") is not None]
    if missed:
        assert f"{len(missed)} of the {len(judged)} goals were not met" in appendix
        for row in missed:
            assert row["id"] in appendix.replace(" ", ""), row["id"]
    else:
        assert "Every goal the suite sets was met in this run." in appendix


def test_the_runs_claims_are_listed(built):
    flat = " ".join(built["text"].split())
    claims = _fixture_results()["claims"]
    assert claims and all(claims.values())
    for name in claims:
        assert f"{name} (passed)" in flat, name
    assert "All passed in this run." in flat


def test_snapshot_holds_the_run_files(built):
    data = built["dir"] / "data"
    names = {
        "results.json",
        "sweep.json",
        "bench.json",
        "loss_curves.png",
        "perplexities.png",
        "rank_sweep.png",
        "spectrum.png",
    }
    assert names | {"README.md"} == {p.name for p in data.iterdir()}
    for name in names:
        assert (data / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_rebuilds_from_the_snapshot_alone_byte_for_byte(built, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    before = _state(built["dir"] / "data")
    out = paper_build.build(None, data_dir=built["dir"] / "data", out=tmp_path / "again.pdf")
    assert out.read_bytes() == built["pdf"].read_bytes()  # the snapshot's bench.json was used
    assert _state(built["dir"] / "data") == before  # and the snapshot was only read


def test_benchmark_figures_come_from_bench_json(built):
    text = built["text"]
    # The errata's measured slowdown of the course's layer, no longer typed by hand.
    assert f"{_bench_ratio('train.7m.course_vs_full'):.2f}×" in text
    assert "1.8×" not in text
    for row_id in (
        "train.cpu.lora_lab_vs_full",
        "train.7m.lora_lab_vs_full",
        "train.7m.lora_lab_plain_vs_full",
        "train.7m.peft_vs_full",
        "train.7m.loralib_vs_full",
        "infer.7m.merged_vs_base",
        "infer.7m.unmerged_vs_base",
        "train.cpu.frozen_vs_full",  # the floor: in the table and in the text after it
        "train.7m.frozen_vs_full",
        "train.cpu.course_vs_full",  # the course's layer, in the table
    ):
        assert f"{_bench_ratio(row_id):.2f}×" in text, row_id
    assert "BitFit" in text
    assert f"{100 * _bench_ratio('memory.course.lora_lab_vs_full'):.0f}%" in text
    assert f"{100 * _bench_ratio('memory.course.frozen_vs_full'):.0f}%" in text
    assert f"{100 * _bench_ratio('memory.course.small_batch.lora_lab_vs_full'):.0f}%" in text
    # The machine, and the warning that it was busy (the fixture says so).
    flat = " ".join(text.split())
    assert "The course’s layer (ΔW built) 1.55× 1.65×" in flat  # both models' ratios, in the table
    assert "measures the same effect on its course profile" in flat
    assert "TEST FIXTURE CPU, 1 torch thread on 2 logical cores" in flat
    assert "the machine was busy during the run (load average up to 4.4 on 2 cores)" in flat
    # The round-to-round spread the experiment chapter quotes: min and max of the fixture's rounds.
    assert "between 580 and 740 ms" in flat


def test_profile_settings_are_read_not_typed(tmp_path):
    """The settings table (nested profile_settings) and the split shares follow results.json."""
    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    settings = results["profile_settings"]
    settings["finetune"]["epochs"] = 37.0
    settings["pretrain"].update(epochs=6.0, lr=0.0025)
    settings["model"].update(n_layer=3, n_head=8, block_size=96)
    settings.update(batch_size=48, seed=7)
    settings["full"]["lr"] = 0.0004
    sizes = results["split_sizes"]
    sizes.update(source_train=600, source_val=100, target_train=270, target_val=30)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    text = _text(paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None))
    flat = " ".join(text.split())
    assert "Fine-tuning epochs (every run) 37" in flat
    assert _squash("its LoRA recipes; s = α/r; every recipe adapts every nn.Linear of the model") in _squash(flat)
    assert "LoRA recipe r α s lr course 4 1 0.250 1e−3 tuned 8 16 2.000 3e−3" in flat
    for label, value in (
        ("Transformer blocks", "3"),
        ("Attention heads", "8"),
        ("Context length (characters)", "96"),
        ("Batch size (sequences)", "48"),
        ("Pre-training epochs", "6"),
        ("Pre-training learning rate", "2.5e−3"),
        ("Full fine-tuning learning rate", "4e−4"),
        ("Random seed", "7"),
    ):
        assert f"{label} {value} " in flat, label
    assert "the first 70% is the source part" in flat
    assert "keeps its last 14% for validation, the target part its last 10%" in flat


def test_a_recipe_with_its_own_epochs_and_rslora_is_shown_as_such(tmp_path):
    """A recipe may set its own epochs (then the table says so per recipe and the text stops
    claiming equal budgets), use rsLoRA (then s = alpha / sqrt(r)) and adapt its own layers (then
    a column says which)."""
    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    for recipes in (results["recipes"], results["profile_settings"]["recipes"]):
        recipes["lora"].update(epochs=12.0, use_rslora=True, target_modules=["q", "v"])
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    text = _text(paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None))
    flat = " ".join(text.split())
    assert "Fine-tuning epochs (default) 5" in flat and "(every run)" not in flat
    assert "LoRA recipe r α s lr Epochs Adapted" in flat  # the recipes adapt different layers: a column says which
    caption = "its LoRA recipes; s = α/r (α/√r for rsLoRA recipes); “all linear”: every nn.Linear"
    assert _squash(caption) in _squash(flat)
    assert "course 4 1 0.250 1e−3 5 all linear tuned 8 16 5.657 3e−3 12 q, v" in flat  # 16/√8
    assert _squash("so s = 5.657 (rsLoRA, s = α/√r)") in _squash(flat)
    assert "for the same number of epochs" not in flat and "in its own number of epochs" in flat


def test_without_bench_json_the_text_says_how_to_produce_it(tmp_path):
    out = paper_build.build(FIXTURE, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None)
    flat = " ".join(_text(out).split())
    assert "were not part of this build; make bench measures them" in flat
    assert f"{_bench_ratio('train.7m.course_vs_full'):.2f}×" not in flat
    assert "TEST FIXTURE CPU" not in flat
    assert not (tmp_path / "data" / "bench.json").exists()


def test_a_quick_bench_run_is_not_quoted(tmp_path):
    bench = _fixture_bench()
    bench["quick"] = True
    (tmp_path / "quick.json").write_text(json.dumps(bench), encoding="utf-8")
    out = paper_build.build(FIXTURE, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", bench=tmp_path / "quick.json")
    flat = " ".join(_text(out).split())
    assert "--quick smoke run" in flat
    assert f"{_bench_ratio('train.7m.course_vs_full'):.2f}×" not in flat


def test_run_dir_takes_the_benchmark_suites_latest_results(tmp_path, monkeypatch):
    """bench="auto" with a run folder: benchmarks/results/latest.json (here the fixture's)."""
    monkeypatch.setattr(paper_build, "DEFAULT_BENCH", FIXTURE_BENCH)
    paper_build.build(FIXTURE, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE)
    assert (tmp_path / "data" / "bench.json").read_bytes() == FIXTURE_BENCH.read_bytes()

    # Without it, a new run keeps the snapshot's bench.json rather than dropping it.
    monkeypatch.setattr(paper_build, "DEFAULT_BENCH", tmp_path / "no-bench-yet.json")
    paper_build.build(FIXTURE, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE)
    assert (tmp_path / "data" / "bench.json").read_bytes() == FIXTURE_BENCH.read_bytes()


def test_bench_alone_refreshes_only_bench_json(built, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built["dir"] / "data", data)
    bench = _fixture_bench()
    bench["rows"][0]["ratio"] = 0.5
    (tmp_path / "new.json").write_text(json.dumps(bench), encoding="utf-8")
    paper_build.build(None, data_dir=data, out=tmp_path / "x.pdf", date=DATE, bench=tmp_path / "new.json")
    assert (data / "bench.json").read_bytes() == (tmp_path / "new.json").read_bytes()
    for name in ("results.json", "sweep.json", "spectrum.png"):
        assert (data / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_missing_or_malformed_bench_is_a_clear_error_and_changes_nothing(built, tmp_path):
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)

    with pytest.raises(paper_build.BuildError, match=r"nope\.json do not exist; produce them with `make bench`"):
        paper_build.build(FIXTURE, data_dir=data, out=out, bench=tmp_path / "nope.json")

    broken = tmp_path / "latest.json"
    bench = _fixture_bench()
    del bench["rows"][3]["ratio"]
    bench["machine"]["busy"] = "maybe"
    broken.write_text(json.dumps(bench), encoding="utf-8")
    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(FIXTURE, data_dir=data, out=out, bench=broken)
    message = str(error.value)
    assert str(broken) in message and "make bench" in message
    assert "rows[3] (train.cpu.loralib_vs_full).ratio must be a positive finite number" in message
    assert "machine.busy must be true or false" in message

    broken.write_text(FIXTURE_BENCH.read_text(encoding="utf-8").replace('"ratio": 1.6543', '"ratio": NaN'))
    with pytest.raises(paper_build.BuildError, match=r"NaN.*make bench"):
        paper_build.build(FIXTURE, data_dir=data, out=out, bench=broken)

    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "latest.json", "out.pdf"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.clear(), "'quick' must be true or false"),
        (lambda b: b.update(rows=[]), "'rows' must be a non-empty list"),
        (lambda b: b["rows"].append(dict(b["rows"][0])), "appears twice"),
        (lambda b: b["rows"][0].update(ratio=-1.0), r"rows\[0\] \(train.cpu.lora_lab_vs_full\).ratio"),
        (lambda b: b["machine"].update(torch_threads=0), "machine.torch_threads must be a positive integer"),
        (lambda b: b["settings"].update(models={"7m": {}}), "settings.models must map model keys"),
    ],
)
def test_malformed_bench_is_rejected(change, message):
    bench = _fixture_bench()
    change(bench)
    with pytest.raises(paper_build.BuildError, match=message):
        paper_build.validate_bench(bench)
    with pytest.raises(paper_build.BuildError, match="not the benchmark results"):
        paper_build.validate_bench({"quick": False, "rows": "none"})


def test_repository_outputs_are_untouched(built):
    after = {**_state(REPO / "comentario_LoRA.pdf"), **_state(REPO / "paper" / "data")}
    assert after == built["protected"]


def test_changed_numbers_and_missing_optional_pieces(tmp_path):
    """Numbers follow the JSON, and a run without the sweep and the spectrum still builds."""
    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    old = f"{results['models']['lora']['target_ppl']:.3f}"
    _set_lora_target_ppl(results, 1.7321)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (run / "sweep.json").unlink()
    (run / "spectrum.png").unlink()

    out = paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None)
    text = _text(out)
    assert "1.732" in text and old not in text
    assert "spectrum.png is not in the results" in text
    assert "The rank sweep (sweep.json) is not part of the results" in text
    assert not (tmp_path / "data" / "spectrum.png").exists()


def test_a_shorter_sweep_says_so(built, tmp_path):
    """The sweep's epochs are printed, and a sweep shorter than the main runs is flagged as not
    comparable with the results table; the fixture's sweep records no epochs and gets neither."""
    fixture_text = " ".join(built["text"].split())
    assert "each trained for" not in fixture_text and "That is shorter" not in fixture_text
    run = _copy_fixture(tmp_path / "run")
    sweep = json.loads((run / "sweep.json").read_text(encoding="utf-8"))
    for entry in sweep["runs"]:
        entry["epochs"] = 2.0
    (run / "sweep.json").write_text(json.dumps(sweep), encoding="utf-8")
    finetune_epochs = _fixture_results()["profile_settings"]["finetune"]["epochs"]
    assert finetune_epochs > 2.0

    pdf = paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None)
    text = " ".join(_text(pdf).split())  # one space wherever the PDF breaks a line
    assert "each trained for 2 epochs" in text
    assert f"That is shorter than the {finetune_epochs:g} epochs of the runs in Table" in text


def test_missing_run_dir_is_a_clear_error_and_writes_nothing(tmp_path):
    out, data = tmp_path / "out.pdf", tmp_path / "data"
    proc = subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--run-dir",
            str(tmp_path / "no-such-run"),
            "--data-dir",
            str(data),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no-such-run does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_snapshot_and_no_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(paper_build.BuildError, match="make pdf"):
        paper_build.build(None, data_dir=tmp_path / "data", out=tmp_path / "out.pdf")
    assert list(tmp_path.iterdir()) == []


def test_invalid_results_leave_snapshot_and_pdf_unchanged(built, tmp_path):
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)

    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    del results["models"]["full"]
    results["models"]["lora"]["target_ppl"] = 0.5
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(run, data_dir=data, out=out, bench=None)
    assert "models.full is missing" in str(error.value)
    assert "models.lora.target_ppl must be a finite perplexity >= 1" in str(error.value)
    assert str(error.value).endswith("Rerun `lora-lab run` (or `make pdf`) to regenerate it.")

    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.pdf", "run"]


def _old_schema(results: dict) -> None:
    """``results`` as lora_lab wrote it before its refactor: the course's recipe called
    ``lora_seed``, ``checks`` for ``claims``, and a flat ``profile_settings``."""
    for section in ("models", "recipes", "histories"):
        results[section] = {("lora_seed" if k == "lora_course" else k): v for k, v in results[section].items()}
    results["recipes"]["lora_seed"]["name"] = "lora_seed"
    results["checks"] = results.pop("claims")
    nested = results["profile_settings"]
    results["profile_settings"] = {
        "name": nested["name"],
        **nested["model"],
        "batch_size": nested["batch_size"],
        "pretrain_epochs": nested["pretrain"]["epochs"],
        "pretrain_lr": nested["pretrain"]["lr"],
        "finetune_epochs": nested["finetune"]["epochs"],
        "full_lr": nested["full"]["lr"],
        "seed": nested["seed"],
    }


def _broken_history(results: dict) -> None:
    del results["histories"]["lora"]["train_loss"]


def _both(results: dict) -> None:
    _old_schema(results)
    results["recipes"]["lora_seed"]["rank"] = 0


OLD_NAMES = (
    "'checks' is not a field of results.json (an older lora_lab's? 'checks' is now 'claims')",
    "profile_settings must be nested as Profile.to_dict writes it",
)


@pytest.mark.parametrize(
    ("change", "problems"),
    [
        (_old_schema, ("does not match the contract", *OLD_NAMES)),
        (_broken_history, ("does not match the contract", "histories.lora must have 'train_loss' (numbers)")),
        (  # every problem at once: the contract's, then the old names
            _both,
            ("does not match the contract", "recipes.lora_seed must have a positive int 'rank'", *OLD_NAMES),
        ),
        (
            lambda r: r["recipes"]["lora_course"].update(target_modules="q"),
            ("recipes.lora_course.target_modules must be null or a list of module names",),
        ),
        (
            lambda r: r["profile_settings"]["model"].update(n_embd=0),
            ("profile_settings.model.n_embd must be a positive integer, got 0",),
        ),
        (lambda r: r["claims"].update(no_model_below_floor="yes"), ("claims must map claim names to true/false",)),
        (lambda r: r["histories"]["full"].update(val_loss=[1, 2]), ("histories.full must have",)),
    ],
    ids=["old-schema", "broken-history", "old-schema-and-broken-recipe", "recipe", "settings", "claims", "val-loss"],
)
def test_old_schema_or_broken_results_are_refused_and_nothing_is_written(tmp_path, change, problems):
    run = _copy_fixture(tmp_path / "run")
    results = _fixture_results()
    change(results)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")

    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", bench=None)
    message = str(error.value)
    assert message.startswith(str((run / "results.json").resolve()))
    for problem in problems:
        assert problem in message, problem
    assert message.endswith("\nRerun `lora-lab run` (or `make pdf`) to regenerate it.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no snapshot, no PDF


def test_nan_and_broken_figures_are_rejected(tmp_path):
    run = _copy_fixture(tmp_path / "run")
    text = (run / "results.json").read_text(encoding="utf-8")
    (run / "results.json").write_text(text.replace('"target_ppl": 2.4137', '"target_ppl": NaN'), encoding="utf-8")
    with pytest.raises(paper_build.BuildError, match="NaN"):
        paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", bench=None)

    (run / "results.json").write_text(text, encoding="utf-8")
    (run / "perplexities.png").write_text("not an image", encoding="utf-8")
    with pytest.raises(paper_build.BuildError, match="perplexities.png is not a PNG"):
        paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", bench=None)
    assert not (tmp_path / "data").exists() and not (tmp_path / "x.pdf").exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"runs": []}, "one entry per rank"),
        ({"runs": [{"rank": 4}]}, r"runs\[0\].target_ppl"),
        ({"runs": [{"rank": 0, "target_ppl": 2.0}]}, r"runs\[0\].rank must be a positive integer"),
        ({"runs": [{"rank": 4, "target_ppl": 2.0}, {"rank": 4, "target_ppl": 1.9}]}, "only once"),
    ],
)
def test_malformed_sweep_is_rejected(sweep, message):
    with pytest.raises(paper_build.BuildError, match=message):
        paper_build.validate_sweep(sweep)


# --- failures outside validation: unreadable files, a missing compiler, a failing last step -----


def _permission_denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied (injected by the test)", str(path))


def _fail_replace_onto(monkeypatch, should_fail) -> None:
    """Make os.replace(src, dst) raise PermissionError when should_fail(Path(src), Path(dst)), as a
    full disk or a read-only folder would; every other move goes through."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if should_fail(Path(src), Path(dst)):
            raise _permission_denied(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _set_lora_target_ppl(results: dict, value: float) -> None:
    """Change the tuned LoRA's target perplexity in decoded results.json: in ``models`` and, the
    fixture being a one-seed run, in its values over the seeds, which must agree."""
    results["models"]["lora"]["target_ppl"] = value
    results["across_seeds"]["lora"]["target_ppl"] = {"values": [value], "mean": value, "min": value, "max": value}


def _run_with_new_numbers(tmp_path: Path) -> Path:
    """A run folder whose snapshot would differ from the built one in results.json."""
    run = _copy_fixture(tmp_path / "run")
    results = _fixture_results()
    _set_lora_target_ppl(results, 1.7321)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return run


@pytest.mark.parametrize("step", ["checking its PNG signature", "staging it for Typst"])
def test_an_unreadable_run_file_is_a_clear_error_and_changes_nothing(built, tmp_path, monkeypatch, step):
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)
    run = _copy_fixture(tmp_path / "run")
    figure = (run / "spectrum.png").resolve()  # as build() names it
    # The tests may run as root, which chmod cannot lock out; the read fails by injection instead.
    if step == "checking its PNG signature":
        real_open = Path.open

        def open_(self, *args, **kwargs):
            if self == figure:
                raise _permission_denied(self)
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
    else:
        real_copy2 = shutil.copy2

        def copy2(src, dst, *args, **kwargs):
            if Path(src) == figure:
                raise _permission_denied(src)
            return real_copy2(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, "copy2", copy2)

    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(run, data_dir=data, out=out, bench=None)
    message = str(error.value)
    assert str(figure) in message and "Permission denied" in message
    assert "Nothing was changed" in message

    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.pdf", "run"]


def test_a_missing_typst_package_says_to_install_the_dependencies(built, tmp_path, monkeypatch):
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)
    monkeypatch.setitem(sys.modules, "typst", None)  # `import typst` now raises ImportError

    with pytest.raises(paper_build.BuildError, match=r"`typst`.*make setup.*pip install -e \."):
        paper_build.build(_run_with_new_numbers(tmp_path), data_dir=data, out=out, bench=None)

    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.pdf", "run"]


@pytest.mark.parametrize("failing", ["the PDF", "the snapshot"])
def test_a_failing_last_move_leaves_snapshot_and_pdf_as_they_were(built, tmp_path, monkeypatch, failing):
    """The snapshot is swapped just before the PDF is moved into place; if either move fails,
    the old snapshot is put back and the old PDF stays."""
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)
    run = _run_with_new_numbers(tmp_path)
    # What Typst makes of the data is not the point here, and stubbing it keeps the test quick.
    monkeypatch.setattr(paper_build, "_compile", lambda stage, date: b"%PDF-1.7 new")
    if failing == "the PDF":
        _fail_replace_onto(monkeypatch, lambda src, dst: dst == out)
    else:  # moving the new snapshot in; putting the old one back must still work
        _fail_replace_onto(monkeypatch, lambda src, dst: dst == data and src.name.startswith(".data-new"))

    with pytest.raises(paper_build.BuildError, match=r"could not write .*Permission denied.*Nothing was changed"):
        paper_build.build(run, data_dir=data, out=out, bench=None)

    assert _state(data) == before
    assert (data / "results.json").read_bytes() == (FIXTURE / "results.json").read_bytes()
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.pdf", "run"]  # no hidden leftovers

    # The same build succeeds once the moves do, so the failure above came from the injected one.
    monkeypatch.undo()
    monkeypatch.setattr(paper_build, "_compile", lambda stage, date: b"%PDF-1.7 new")
    paper_build.build(run, data_dir=data, out=out, bench=None)
    assert out.read_bytes() == b"%PDF-1.7 new"
    assert (data / "results.json").read_bytes() == (run / "results.json").read_bytes()


def test_when_the_old_snapshot_cannot_be_put_back_the_error_says_where_it_is(built, tmp_path, monkeypatch):
    data, out, _ = _snapshot_and_previous_pdf(built, tmp_path)
    old_results = (data / "results.json").read_bytes()
    monkeypatch.setattr(paper_build, "_compile", lambda stage, date: b"%PDF-1.7 new")
    # The PDF's move fails, and so does moving the old snapshot back from its hidden folder.
    _fail_replace_onto(
        monkeypatch, lambda src, dst: dst == out or (dst == data and src.parent.name.startswith(".data-old"))
    )

    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(_run_with_new_numbers(tmp_path), data_dir=data, out=out, bench=None)
    message = str(error.value)
    assert "could not be put back" in message
    kept = Path(message.split("the previous snapshot is kept in ")[1].split(": put it back as")[0])
    assert kept.parent.name.startswith(".data-old") and kept.parent.parent == tmp_path
    assert (kept / "results.json").read_bytes() == old_results  # not deleted with the other leftovers
    assert out.read_bytes() == b"the previous PDF"


def test_the_command_line_prints_the_error_not_a_traceback(built, tmp_path, monkeypatch, capsys):
    data, out, before = _snapshot_and_previous_pdf(built, tmp_path)
    monkeypatch.setitem(sys.modules, "typst", None)

    argv = ["--run-dir", str(FIXTURE), "--data-dir", str(data), "--out", str(out), "--no-bench"]
    assert paper_build.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "make setup" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"


def _with_seeds(results: dict, source_offsets: dict[str, tuple[float, float]]) -> dict:
    """``results`` (one seed) made a 3-seed run: each model's source perplexity gets the two extra
    seeds ``value + offset``; every other metric repeats its value."""
    results = json.loads(json.dumps(results))
    results["seeds"] = [0, 1, 2]
    for name, metrics in results["across_seeds"].items():
        for metric, stats in metrics.items():
            first = stats["values"][0]
            extra = source_offsets.get(name, (0.0, 0.0)) if metric == "source_ppl" else (0.0, 0.0)
            spread = Spread.of([first, first + extra[0], first + extra[1]])
            metrics[metric] = dict(values=list(spread.values), mean=spread.mean, min=spread.low, max=spread.high)
    return results


@pytest.mark.parametrize(
    "offsets, expected, absent",
    [
        # LoRA's worst seed still below full fine-tuning's best: the comparison is decided.
        ({"lora": (0.01, -0.01), "full": (0.01, -0.01)}, "every LoRA run kept a lower source", "seeds overlap"),
        # LoRA's range reaches into full fine-tuning's: no comparative sentence.
        ({"lora": (0.40, -0.01), "full": (0.01, -0.30)}, "The ranges over the 3 seeds overlap", "forgot less, as"),
    ],
)
def test_a_comparison_is_stated_only_beyond_the_seed_spread(tmp_path, offsets, expected, absent):
    run = _copy_fixture(tmp_path / "run")
    results = _with_seeds(_fixture_results(), offsets)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    flat = " ".join(
        _text(paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE, bench=None)).split()
    )
    assert expected in flat and absent not in flat
    assert "3 seeds." in flat and "± " in flat  # the critical-reading item and the table's mean ± spread
    lora = results["across_seeds"]["lora"]["source_ppl"]
    assert Spread.of(lora["values"]).format() in flat  # the PDF prints mean ± d as lora_lab does


def test_a_single_seed_decides_no_comparison(built):
    flat = " ".join(built["text"].split())
    assert "With a single seed there is no spread to judge this difference by" in flat
    assert "forgot less, as" not in flat and "One run, one seed." in flat


# --- the variants chapter (paper/variants.json) and the spectrum's numbers (sweep.json) ------------


def _variants() -> dict:
    return json.loads((REPO / "paper" / "variants.json").read_text(encoding="utf-8"))


def _rslora() -> dict:
    return json.loads((REPO / "paper" / "rslora.json").read_text(encoding="utf-8"))


def _build_with(
    tmp_path: Path, variants: dict | None = None, sweep: dict | None = None, rslora: dict | None = None
) -> str:
    run = _copy_fixture(tmp_path / "run")
    if sweep is not None:
        (run / "sweep.json").write_text(json.dumps(sweep), encoding="utf-8")
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(variants if variants is not None else _variants()), encoding="utf-8")
    study = tmp_path / "rslora.json"
    study.write_text(json.dumps(rslora if rslora is not None else _rslora()), encoding="utf-8")
    out = paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "out.pdf", bench=None, variants=path,
                            rslora=study)  # fmt: skip
    return _squash(_text(out))


def test_the_fully_trained_rslora_comparison_follows_the_seed_ranges(tmp_path):
    """§6.5 reads paper/rslora.json: a difference between the scalings is stated only when every seed of one
    lies below every seed of the other."""
    study = _rslora()
    big = max(r for r in study["ranks"] if r != study["matched_rank"])
    cell = [r for r in study["runs"] if r["rank"] == big]
    lora_low = min(r["target_ppl"] for r in cell if r["method"] == "lora")
    for run in cell:
        if run["method"] == "rslora":
            run["target_ppl"] = lora_low - 0.01
    text = _build_with(tmp_path / "rslora_lower", rslora=study)
    # 600 characters: a page break (running header, a float's caption) may fall inside the sentence
    at_big = text.split("Trainedtotheend.Shortruns")[1].split(f"Atr={big},LoRAreaches")[1][:600]
    assert "rsLoRAisloweroneveryseed" in at_big.split("Atr=")[0], at_big
    lora_values = [r["target_ppl"] for r in cell if r["method"] == "lora"]
    for run, value in zip([r for r in cell if r["method"] == "rslora"], reversed(lora_values)):
        run["target_ppl"] = value  # the same values: the ranges overlap
    text = _build_with(tmp_path / "rslora_overlap", rslora=study)
    at_big = text.split("Trainedtotheend.Shortruns")[1].split(f"Atr={big},LoRAreaches")[1][:600].split("Atr=")[0]
    assert "overlap,sonodifferenceisresolved" in at_big and "isloweroneveryseed" not in at_big, at_big


def test_a_malformed_rslora_study_is_a_clear_error(tmp_path):
    broken = _rslora()
    broken["runs"] = broken["runs"][1:]
    with pytest.raises(paper_build.BuildError, match="is not an rsLoRA study.*one run per method, rank and seed"):
        _build_with(tmp_path, rslora=broken)
    assert not (tmp_path / "out.pdf").exists()


def test_the_variants_reading_follows_the_seed_ranges_in_variants_json(tmp_path):
    variants = _variants()
    by_name = {v["name"]: v for v in variants["variants"]}
    lora_low = min(run["target_ppl"] for run in by_name["lora"]["runs"])
    text = _build_with(tmp_path / "as_committed", variants)
    dora_ends_above = all(run["target_ppl"] > max(r["target_ppl"] for r in by_name["lora"]["runs"])
                          for run in by_name["dora"]["runs"])  # fmt: skip
    above = text.split("Aboveitoneveryseed:")[1].split(".")[0] if "Aboveitoneveryseed:" in text else ""
    assert ("DoRA" in above) == dora_ends_above, above
    for run in by_name["dora"]["runs"]:  # DoRA now below LoRA on every seed: the sentence must move it
        run["target_ppl"] = lora_low - 0.01
    moved = _build_with(tmp_path / "dora_better", variants)
    below = moved.split("BelowLoRAonthetargetoneveryseed:")[1].split(".")[0]
    assert "DoRA" in below, below


def test_a_malformed_variants_table_is_a_clear_error(tmp_path):
    broken = _variants()
    del broken["variants"][0]["runs"]
    with pytest.raises(paper_build.BuildError, match="is not a variants table"):
        _build_with(tmp_path, broken)
    assert not (tmp_path / "out.pdf").exists()


def test_the_spectrum_is_read_in_numbers_when_sweep_json_holds_them(tmp_path):
    sweep = json.loads((FIXTURE / "sweep.json").read_text(encoding="utf-8"))
    sweep["spectrum"] = {"rank": 16, "by_layer_type": {
        "attn.q": {"full_energy_top_r": 0.70, "full_k90": 30.0, "lora_k90": 9.0, "lora_k99": 13.0},
        "mlp.up": {"full_energy_top_r": 0.62, "full_k90": 35.0, "lora_k90": 11.0, "lora_k99": 14.0},
    }}  # fmt: skip
    text = _build_with(tmp_path, sweep=sweep)
    assert "beyonditstop16directionslies30%–38%ofitsenergy" in text
    assert "9.0–11.0directionshold90%" in text
