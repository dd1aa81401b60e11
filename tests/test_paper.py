"""The companion reading (paper/) builds into a valid PDF whose numbers come from results.json.

Every build here reads the TEST FIXTURE run folder tests/data/paper_run (made-up numbers,
see its make_fixture.py) and writes into pytest's temporary folders: the committed snapshot
paper/data/ and the root comentario_LoRA.pdf are never touched.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pypdf
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "paper_run"
BUILD_SCRIPT = REPO / "paper" / "build.py"
SECTIONS = (
    "Introduction",
    "The method",
    "Why low rank works",
    "Initialisation and scaling",
    "Cost analysis",
    "The experiment",
    "Limitations",
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
    """The PDF's text, NFKC-normalised so that ligatures (ﬁ) read as plain letters."""
    reader = pypdf.PdfReader(pdf)
    return unicodedata.normalize("NFKC", "\n".join(page.extract_text() for page in reader.pages))


def _state(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of a file or of every file under a folder; {} when absent."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _fixture_results() -> dict:
    return json.loads((FIXTURE / "results.json").read_text(encoding="utf-8"))


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
        out = paper_build.build(FIXTURE, data_dir=tmp / "data", out=tmp / "comentario_LoRA.pdf")
    return {"dir": tmp, "pdf": out, "text": _text(out), "protected": protected}


def test_builds_a_valid_pdf_of_8_to_15_pages(built):
    assert built["pdf"] == (built["dir"] / "comentario_LoRA.pdf").resolve()
    reader = pypdf.PdfReader(built["pdf"])
    assert 8 <= len(reader.pages) <= 15, f"{len(reader.pages)} pages"
    assert reader.metadata.title == "Low-Rank Adaptation, Explained and Measured"
    assert "Companion reading to the lora_lab notebooks" in built["text"]
    assert DATE in built["text"]


@pytest.mark.parametrize("title", SECTIONS)
def test_has_the_expected_sections(built, title):
    assert title in built["text"]


def test_has_the_errata_box_and_the_fixture_note(built):
    text = built["text"]
    assert "Errata: what the seed gets wrong" in text
    # The fixture marks itself; the PDF must print that on its title page.
    assert "TEST FIXTURE" in text.split("Contents")[0]


def test_numbers_come_from_results_json(built):
    models = _fixture_results()["models"]
    text = built["text"]
    for name in ("base", "lora", "full"):
        assert f"{models[name]['target_ppl']:.3f}" in text, name
        assert f"{models[name]['source_ppl']:.3f}" in text, name
    assert f"{models['lora']['trainable_params']:,}" in text
    assert f"{models['lora_seed']['trainable_params']:,}" in text


def test_snapshot_holds_the_run_files(built):
    data = built["dir"] / "data"
    names = {"results.json", "sweep.json", "loss_curves.png", "perplexities.png", "rank_sweep.png", "spectrum.png"}
    assert names | {"README.md"} == {p.name for p in data.iterdir()}
    for name in names:
        assert (data / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_rebuilds_from_the_snapshot_alone_byte_for_byte(built, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    out = paper_build.build(None, data_dir=built["dir"] / "data", out=tmp_path / "again.pdf")
    assert out.read_bytes() == built["pdf"].read_bytes()


def test_repository_outputs_are_untouched(built):
    after = {**_state(REPO / "comentario_LoRA.pdf"), **_state(REPO / "paper" / "data")}
    assert after == built["protected"]


def test_changed_numbers_and_missing_optional_pieces(tmp_path):
    """Numbers follow the JSON, and a run without the sweep and the spectrum still builds."""
    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    old = f"{results['models']['lora']['target_ppl']:.3f}"
    results["models"]["lora"]["target_ppl"] = 1.7321
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (run / "sweep.json").unlink()
    (run / "spectrum.png").unlink()

    out = paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf", date=DATE)
    text = _text(out)
    assert "1.732" in text and old not in text
    assert "spectrum.png is not in the results" in text
    assert "The rank sweep (sweep.json) is not part of the results" in text
    assert not (tmp_path / "data" / "spectrum.png").exists()


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
    data = tmp_path / "data"
    shutil.copytree(built["dir"] / "data", data)
    out = tmp_path / "out.pdf"
    out.write_bytes(b"the previous PDF")
    before = _state(data)

    run = _copy_fixture(tmp_path / "run")
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    del results["models"]["full"]
    results["models"]["lora"]["target_ppl"] = 0.5
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    with pytest.raises(paper_build.BuildError) as error:
        paper_build.build(run, data_dir=data, out=out)
    assert "models.full is missing" in str(error.value)
    assert "models.lora.target_ppl must be a finite perplexity >= 1" in str(error.value)

    assert _state(data) == before
    assert out.read_bytes() == b"the previous PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.pdf", "run"]


def test_nan_and_broken_figures_are_rejected(tmp_path):
    run = _copy_fixture(tmp_path / "run")
    text = (run / "results.json").read_text(encoding="utf-8")
    (run / "results.json").write_text(text.replace('"target_ppl": 2.4137', '"target_ppl": NaN'), encoding="utf-8")
    with pytest.raises(paper_build.BuildError, match="NaN"):
        paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf")

    (run / "results.json").write_text(text, encoding="utf-8")
    (run / "perplexities.png").write_text("not an image", encoding="utf-8")
    with pytest.raises(paper_build.BuildError, match="perplexities.png is not a PNG"):
        paper_build.build(run, data_dir=tmp_path / "data", out=tmp_path / "x.pdf")
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
