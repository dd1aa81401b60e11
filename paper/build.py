"""Build the companion reading ``comentario_LoRA.pdf`` from ``paper/`` with Typst.

Usage::

    python paper/build.py [--run-dir DIR] [--bench FILE | --no-bench] [--data-dir DIR] [--out PATH] [--date TEXT]

``--run-dir`` names an output folder of ``lora-lab run``. Its ``results.json`` (against
:class:`lora_lab.experiment.results.RunResults`, which defines it), the optional ``sweep.json``
and the figures the paper uses are checked, the PDF is compiled from them, and
only then are they copied into the committed snapshot folder ``--data-dir`` (default
``paper/data``), replacing it as a whole. Without ``--run-dir`` the PDF is rebuilt from the
snapshot alone, so the document builds without running any experiment. ``make pdf`` runs
``lora-lab run`` and then this script.

The benchmark figures the text quotes (step-time and memory ratios) come from the results of
the benchmark suite, ``benchmarks/results/latest.json`` (written by ``make bench``), snapshotted
as ``bench.json``. With ``--run-dir`` that file is taken when it exists (else the snapshot's
``bench.json`` is kept); ``--bench FILE`` names another one (and, without ``--run-dir``, replaces
only the snapshot's ``bench.json``); ``--no-bench`` builds without benchmark figures, and the
text then says how to produce them. Without ``--run-dir`` or ``--bench`` the snapshot is only read.

Nothing is changed unless everything succeeds: the Typst sources and the data are staged in a
temporary folder and compiled there; only then are the snapshot and the PDF replaced, the old
snapshot kept aside until the PDF is in place and put back if anything fails (see
:class:`_SnapshotSwap`; the PDF goes through :func:`lora_lab.files.atomic_path`). A failure raises
:class:`BuildError` with what was wrong and what to do; on the command line it is printed and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

try:
    from lora_lab.experiment.results import ResultsError, RunResults
    from lora_lab.experiment.rslora_study import RsLoRAStudy
    from lora_lab.experiment.variants import VariantsResults
    from lora_lab.files import atomic_path
except ImportError as error:  # e.g. run with a Python that lacks the project's environment
    raise SystemExit(
        f"error: paper/build.py needs the lora_lab package ({error}); run `make setup` and then "
        "`.venv/bin/python paper/build.py`"
    ) from error

PAPER_DIR = Path(__file__).resolve().parent
REPO_ROOT = PAPER_DIR.parent
DEFAULT_DATA_DIR = PAPER_DIR / "data"
DEFAULT_OUT = REPO_ROOT / "comentario_LoRA.pdf"

#: The Typst sources, relative to ``paper/``, staged for every build.
SOURCES = ("main.typ", "lib.typ", "refs.yml", "chapters")
# `lora-lab variants --seeds 3 --epochs 5` writes it; notebook 07 reads the same file.
DEFAULT_VARIANTS = PAPER_DIR / "variants.json"
# `lora-lab rslora --seeds 3` writes it; notebook 06 reads the same file.
DEFAULT_RSLORA = PAPER_DIR / "rslora.json"
RESULTS = "results.json"
SWEEP = "sweep.json"
#: The benchmark suite's results, as the snapshot names them.
BENCH = "bench.json"
#: Where ``make bench`` (``benchmarks/bench.py``) writes them.
DEFAULT_BENCH = REPO_ROOT / "benchmarks" / "results" / "latest.json"
#: ``build(bench=AUTO)``: the newest benchmark results available (see the module docstring).
AUTO = "auto"
#: Figures the text places, in order; each may be missing (the PDF then says how to make it).
FIGURES = ("loss_curves.png", "perplexities.png", "rank_sweep.png", "spectrum.png")

RUN_REMEDY = "rerun `lora-lab run` (or `make pdf`) to rewrite it"
RESULTS_REMEDY = "Rerun `lora-lab run` (or `make pdf`) to regenerate it."
BENCH_REMEDY = (
    "rerun the benchmark suite (`make bench`, i.e. `python benchmarks/bench.py --threads 1`) to rewrite it, "
    "or build without benchmark figures (`python paper/build.py --no-bench`)"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SNAPSHOT_README = """\
# Results snapshot for the companion reading

Copied from a `lora-lab run` output folder by `paper/build.py`; `paper/main.typ` reads every
number and figure of `comentario_LoRA.pdf` from here. `bench.json`, when present, is a copy of
the benchmark suite's `benchmarks/results/latest.json` (`make bench`); the step-time and memory
ratios the text quotes come from it. Do not edit by hand: regenerate with `make pdf` (or
`python paper/build.py --run-dir <run folder>`; `--bench FILE` refreshes `bench.json` alone).
"""

__all__ = ["BuildError", "build", "validate_results", "validate_sweep", "validate_bench", "main"]


class BuildError(RuntimeError):
    """The PDF could not be built; the message says why and what to do."""


# --- validation ------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (NaN/Infinity cannot be typeset)")


def _load_json(path: Path, remedy: str = RUN_REMEDY) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BuildError(f"cannot read {path}: {error}; {remedy}") from error


def validate_results(results: object, where: str = RESULTS) -> RunResults:
    """Check decoded ``results.json`` against the contract of ``lora-lab run``, which
    :class:`lora_lab.experiment.results.RunResults` defines; return it parsed, or raise
    :class:`BuildError` naming every problem found."""
    try:
        return RunResults.from_json(results, where=where)
    except ResultsError as error:
        raise BuildError(f"{error}\n{RESULTS_REMEDY}") from error


def validate_sweep(sweep: object, where: str = SWEEP) -> None:
    """Check ``sweep.json``: ``{"runs": [{"rank": int, "target_ppl": float, optional "alpha",
    "source_ppl", "trainable_params"}, ...]}``, one entry per rank."""
    problems: list[str] = []
    runs = sweep.get("runs") if isinstance(sweep, dict) else None
    if not (isinstance(runs, list) and runs):
        raise BuildError(
            f'{where}: expected {{"runs": [{{"rank": ..., "target_ppl": ...}}, ...]}} with one entry per rank'
        )
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            problems.append(f"runs[{i}] must be an object")
            continue
        if not (_is_count(run.get("rank")) and run["rank"] > 0):
            problems.append(f"runs[{i}].rank must be a positive integer, got {run.get('rank')!r}")
        for key, required in (("target_ppl", True), ("source_ppl", False)):
            if (required or key in run) and not (_is_number(run.get(key)) and run[key] >= 1):
                problems.append(f"runs[{i}].{key} must be a finite perplexity >= 1, got {run.get(key)!r}")
        if "alpha" in run and not (_is_number(run["alpha"]) and run["alpha"] > 0):
            problems.append(f"runs[{i}].alpha must be a positive number, got {run['alpha']!r}")
        if "trainable_params" in run and not _is_count(run["trainable_params"]):
            problems.append(f"runs[{i}].trainable_params must be a non-negative integer")
    ranks = [run.get("rank") for run in runs if isinstance(run, dict)]
    if len(set(map(repr, ranks))) != len(ranks):
        problems.append("each rank may appear only once")
    spectrum = sweep.get("spectrum")
    if spectrum is not None:
        layers = spectrum.get("by_layer_type") if isinstance(spectrum, dict) else None
        if not (isinstance(spectrum, dict) and _is_count(spectrum.get("rank")) and isinstance(layers, dict) and layers):
            problems.append('spectrum must be {"rank": int, "by_layer_type": {layer type: {...}}}')
        else:
            for kind, row in layers.items():
                share = row.get("full_energy_top_r") if isinstance(row, dict) else None
                if not (_is_number(share) and 0 <= share <= 1 + 1e-9):
                    problems.append(f"spectrum.by_layer_type.{kind}.full_energy_top_r must be a share in [0, 1]")
    if problems:
        raise BuildError(f"{where} is malformed:\n  - " + "\n  - ".join(problems))


def validate_bench(bench: object, where: str = BENCH) -> None:
    """Check the benchmark suite's results (``benchmarks/bench.py``): ``{"quick": bool,
    "machine": {...}, "settings": {"models": {key: {"description": str}}}, "rows": [{"id": str,
    "description": str, "ratio": number, "details": {...}, ...}, ...]}``; raise :class:`BuildError`
    naming every problem found."""
    if not isinstance(bench, dict):
        raise BuildError(
            f"{where}: expected the JSON object that `benchmarks/bench.py` writes, got {type(bench).__name__}; "
            + BENCH_REMEDY
        )
    problems: list[str] = []
    if not isinstance(bench.get("quick"), bool):
        problems.append("'quick' must be true or false")
    machine = bench.get("machine")
    if not isinstance(machine, dict):
        problems.append("'machine' must be an object describing the machine")
    else:
        if not isinstance(machine.get("cpu"), str):
            problems.append("machine.cpu must be a string")
        for key in ("torch_threads", "logical_cores"):
            if not (_is_count(machine.get(key)) and machine[key] > 0):
                problems.append(f"machine.{key} must be a positive integer, got {machine.get(key)!r}")
        if not isinstance(machine.get("busy"), bool):
            problems.append("machine.busy must be true or false")
        for key in ("load_average_at_start", "load_average_at_end"):
            loads = machine.get(key)
            if loads is not None and not (isinstance(loads, list) and loads and all(map(_is_number, loads))):
                problems.append(f"machine.{key} must be null or a list of numbers")
    settings = bench.get("settings")
    models = settings.get("models") if isinstance(settings, dict) else None
    if not (
        isinstance(models, dict)
        and all(isinstance(m, dict) and isinstance(m.get("description"), str) for m in models.values())
    ):
        problems.append("settings.models must map model keys to objects with a 'description' string")
    rows = bench.get("rows")
    if not (isinstance(rows, list) and rows):
        problems.append("'rows' must be a non-empty list of measured ratios")
        rows = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"rows[{i}] must be an object")
            continue
        row_id = row.get("id")
        if not isinstance(row_id, str) or not row_id:
            problems.append(f"rows[{i}].id must be a non-empty string")
        elif row_id in seen:
            problems.append(f"rows[{i}].id {row_id!r} appears twice")
        else:
            seen.add(row_id)
        name = f"rows[{i}] ({row_id})" if isinstance(row_id, str) else f"rows[{i}]"
        if not isinstance(row.get("description"), str):
            problems.append(f"{name}.description must be a string")
        if not (_is_number(row.get("ratio")) and row["ratio"] > 0):
            problems.append(f"{name}.ratio must be a positive finite number, got {row.get('ratio')!r}")
        if not isinstance(row.get("details", {}), dict):
            problems.append(f"{name}.details must be an object")
        if row.get("passed") not in (True, False, None):
            problems.append(f"{name}.passed must be true, false or null")
    if problems:
        raise BuildError(
            f"{where} is not the benchmark results `benchmarks/bench.py` writes:\n  - "
            + "\n  - ".join(problems)
            + f"\nTo fix it, {BENCH_REMEDY}."
        )


def _check_bench(path: Path) -> Path:
    """``path``, once it is known to hold valid benchmark results."""
    if not path.is_file():
        raise BuildError(
            f"the benchmark results {path} do not exist; produce them with `make bench` "
            "(`python benchmarks/bench.py --threads 1`), or build without them (`--no-bench`)"
        )
    validate_bench(_load_json(path, BENCH_REMEDY), where=str(path))
    return path


def _collect(folder: Path, what: str) -> dict[str, Path]:
    """The files of ``folder`` the paper uses, checked; name -> path."""
    if not folder.is_dir():
        raise BuildError(f"{what} {folder} does not exist or is not a folder")
    results_path = folder / RESULTS
    if not results_path.is_file():
        raise BuildError(
            f"{what} {folder} has no {RESULTS}; it must be an output folder of `lora-lab run` "
            "(e.g. `lora-lab run --profile cpu --out runs/builtin-cpu`)"
        )
    files = {RESULTS: results_path}
    validate_results(_load_json(results_path), where=str(results_path))
    if (folder / SWEEP).is_file():
        validate_sweep(_load_json(folder / SWEEP), where=str(folder / SWEEP))
        files[SWEEP] = folder / SWEEP
    for name in FIGURES:
        path = folder / name
        if path.is_file():
            try:
                with path.open("rb") as handle:
                    signature = handle.read(len(PNG_SIGNATURE))
            except OSError as error:
                raise BuildError(
                    f"cannot read {path}: {error}. Nothing was changed; make the file readable, or {RUN_REMEDY}"
                ) from error
            if signature != PNG_SIGNATURE:
                raise BuildError(f"{path} is not a PNG image; rerun `lora-lab run` to redraw it")
            files[name] = path
    return files


# --- building ----------------------------------------------------------------------------------


def _source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH (https://reproducible-builds.org), which fixes the PDF's timestamps."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BuildError(f"SOURCE_DATE_EPOCH must be a number of seconds since 1970, got {value!r}")
    return int(value)


def _default_date() -> str:
    """Today, or SOURCE_DATE_EPOCH's day for reproducible builds."""
    epoch = _source_date_epoch()
    day = dt.datetime.fromtimestamp(epoch, dt.timezone.utc).date() if epoch is not None else dt.date.today()
    return f"{day.day} {day:%B %Y}"


def _check_variants(path: Path) -> Path:
    """The variants table, read with lora_lab's own reader (a clear error names what is wrong)."""
    if not path.is_file():
        raise BuildError(f"{path} does not exist: run `lora-lab variants --seeds 3 --epochs 5 --out {path}`")
    try:
        VariantsResults.from_json(path.read_text(encoding="utf-8"), where=str(path))
    except (ValueError, KeyError, TypeError) as error:
        raise BuildError(f"{path} is not a variants table: {error}") from None
    return path.resolve()


def _check_rslora(path: Path) -> Path:
    """rsLoRA against LoRA, fully trained, read with lora_lab's own reader."""
    if not path.is_file():
        raise BuildError(f"{path} does not exist: run `lora-lab rslora --seeds 3 --out {path}`")
    try:
        RsLoRAStudy.from_json(path.read_text(encoding="utf-8"), where=str(path))
    except ValueError as error:
        raise BuildError(f"{path} is not an rsLoRA study: {error}") from None
    return path.resolve()


def _stage(files: dict[str, Path], stage: Path) -> None:
    for name in SOURCES:
        source = PAPER_DIR / name
        if source.is_dir():
            shutil.copytree(source, stage / name)
        elif source.is_file():
            shutil.copy2(source, stage / name)
        else:
            raise BuildError(f"the paper source {source} is missing; restore it from git")
    data = stage / "data"
    data.mkdir()
    for name, path in files.items():
        shutil.copy2(path, data / name)
    # Typst cannot test whether a file exists, so tell it which optional pieces are present.
    (data / "manifest.json").write_text(json.dumps({"files": sorted(files)}, indent=2) + "\n", encoding="utf-8")


def _compile(stage: Path, date: str) -> bytes:
    # Imported here so that --help and the checks work without the compiler.
    try:
        import typst
    except ImportError as error:
        raise BuildError(
            f"the Typst compiler (the Python package `typst`) cannot be imported: {error}. Nothing was changed; "
            "install the project's dependencies (`make setup`, or `pip install -e .` in the project's "
            "environment) and build again with that environment's Python (`.venv/bin/python paper/build.py`)"
        ) from error

    try:
        # Only the fonts embedded in Typst, so the PDF looks the same on every machine.
        options = {"root": str(stage), "ignore_system_fonts": True, "sys_inputs": {"date": date}}
        epoch = _source_date_epoch()
        if epoch is not None:
            options["timestamp"] = epoch
        pdf, warnings = typst.compile_with_warnings(str(stage / "main.typ"), **options)
    except typst.TypstError as error:
        # The diagnostic names the file and line (paths are relative to the staged copy of paper/).
        detail = getattr(error, "diagnostic", None) or str(error)
        raise BuildError(f"Typst could not compile paper/main.typ:\n{detail}") from error
    for warning in warnings:
        print(f"typst warning: {warning}", file=sys.stderr)
    if not pdf or not pdf.startswith(b"%PDF"):
        raise BuildError("Typst returned no PDF; run `python paper/build.py` again and report the problem")
    return pdf


def _sibling_folder(data_dir: Path, role: str) -> Path:
    """A new hidden folder next to ``data_dir``. Plain mkdir (not mkdtemp, which makes a private
    0o700 folder): the snapshot is ordinary content and gets the umask's permissions. The random
    suffix keeps concurrent builds apart."""
    folder = data_dir.parent / f".{data_dir.name}-{role}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


class _SnapshotSwap:
    """Replaces the snapshot folder ``data_dir`` by one holding exactly ``files`` (plus a README)
    in steps that can be undone, so that the PDF can still be moved into place while the old
    snapshot can be put back.

    Entering copies the new files into a hidden folder next to ``data_dir`` (nothing visible
    changes); :meth:`swap` moves the old folder aside and the new one in; leaving deletes the old
    folder or, when the block failed, puts it back. Folders are moved with ``os.replace``, a
    rename within one filesystem, so the old snapshot is never half deleted or half copied.
    """

    def __init__(self, files: dict[str, Path], data_dir: Path) -> None:
        self.files, self.data_dir = files, data_dir
        self.fresh: Path | None = None  # the new snapshot until swap() moves it in
        self.aside: Path | None = None  # the hidden folder that receives the old snapshot
        self.old: Path | None = None  # where the old snapshot lies once swap() has moved it
        self.swapped = False

    def __enter__(self) -> _SnapshotSwap:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.fresh = _sibling_folder(self.data_dir, "new")
        try:
            for name, path in self.files.items():
                shutil.copy2(path, self.fresh / name)
            (self.fresh / "README.md").write_text(SNAPSHOT_README, encoding="utf-8")
        except BaseException:
            shutil.rmtree(self.fresh, ignore_errors=True)
            raise
        return self

    def swap(self) -> None:
        if self.data_dir.exists():
            self.aside = _sibling_folder(self.data_dir, "old")
            os.replace(self.data_dir, self.aside / self.data_dir.name)
            self.old = self.aside / self.data_dir.name
        os.replace(self.fresh, self.data_dir)
        self.swapped = True

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None:
                self._restore(error)
        finally:
            shutil.rmtree(self.fresh, ignore_errors=True)
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)

    def _restore(self, error: BaseException) -> None:
        try:
            if self.swapped:
                # The new snapshot goes back where it was prepared, freeing data_dir for the old one.
                os.replace(self.data_dir, self.fresh)
                self.swapped = False
            if self.old is not None:
                os.replace(self.old, self.data_dir)
                self.old = None
        except OSError as restore_error:
            if self.old is not None:
                self.aside = None  # never delete what may be the only copy of the old snapshot
                what_to_do = f"the previous snapshot is kept in {self.old}: put it back as {self.data_dir}"
            else:
                what_to_do = f"there was no snapshot before: delete {self.data_dir}"
            raise BuildError(
                f"the build failed ({error}) and the previous results snapshot could not be put back "
                f"({restore_error}); {what_to_do}, then build again"
            ) from restore_error


def _pick_bench(bench: str | os.PathLike | None, from_run: bool, data_dir: Path) -> Path | None:
    """The benchmark results to build with (see :func:`build`), checked; None for none."""
    if bench is None:
        return None
    if isinstance(bench, str) and bench == AUTO:
        snapshot = data_dir / BENCH
        if from_run and DEFAULT_BENCH.is_file():
            return _check_bench(DEFAULT_BENCH)
        return _check_bench(snapshot) if snapshot.is_file() else None
    return _check_bench(Path(bench).resolve())


def build(
    run_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    out: str | os.PathLike = DEFAULT_OUT,
    date: str | None = None,
    bench: str | os.PathLike | None = AUTO,
    variants: str | os.PathLike = DEFAULT_VARIANTS,
    rslora: str | os.PathLike = DEFAULT_RSLORA,
) -> Path:
    """Build the PDF; return its path.

    Args:
        run_dir: an output folder of ``lora-lab run``; its data replaces the snapshot in
            ``data_dir`` once the PDF has compiled. None: build from the snapshot.
        data_dir: the snapshot folder (``paper/data``); tests point it at a temporary folder.
        out: where the PDF goes (``comentario_LoRA.pdf`` at the repository root).
        date: the date printed on the title page (default: today, or SOURCE_DATE_EPOCH's).
        bench: the benchmark suite's results to quote, snapshotted as ``bench.json``. ``"auto"``
            (the default): with ``run_dir``, ``benchmarks/results/latest.json`` when it exists,
            else the snapshot's ``bench.json``; without, the snapshot's ``bench.json``. A path:
            that file (without ``run_dir`` it then replaces the snapshot's ``bench.json``).
            None: no benchmark figures; the text says how to produce them.
        variants: the variants table (``lora-lab variants``'s JSON, ``paper/variants.json``).
        rslora: rsLoRA against LoRA fully trained (``lora-lab rslora``'s JSON, ``paper/rslora.json``).
    """
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    variants_path = _check_variants(Path(variants))
    rslora_path = _check_rslora(Path(rslora))
    if run_dir is not None:
        files = _collect(Path(run_dir).resolve(), "the run directory")
    elif (data_dir / RESULTS).is_file():
        files = _collect(data_dir, "the results snapshot")
    else:
        raise BuildError(
            f"no results to build from: {data_dir / RESULTS} does not exist and no --run-dir was given. "
            "Run `make pdf`, or `lora-lab run --profile cpu --out runs/builtin-cpu` followed by "
            "`python paper/build.py --run-dir runs/builtin-cpu`."
        )
    bench_path = _pick_bench(bench, run_dir is not None, data_dir)
    if bench_path is not None:
        files[BENCH] = bench_path
    # The snapshot changes when the data comes from elsewhere: a run folder, or a bench file
    # given explicitly. Building from the snapshot as it is leaves it alone.
    new_snapshot = (run_dir is not None and Path(run_dir).resolve() != data_dir) or (
        bench_path is not None and bench_path != data_dir / BENCH
    )
    if not out.parent.is_dir():
        raise BuildError(f"cannot write {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise BuildError(f"cannot write the PDF to {out}: it is a folder; give --out a file name")
    try:
        with tempfile.TemporaryDirectory(prefix="lora-lab-paper-") as tmp:
            stage = Path(tmp) / "paper"
            stage.mkdir()
            _stage(files, stage)
            shutil.copy2(variants_path, stage / "variants.json")
            shutil.copy2(rslora_path, stage / "rslora.json")
            pdf = _compile(stage, date or _default_date())
    except OSError as error:  # e.g. a file of the run that cannot be read, or a full temporary folder
        raise BuildError(
            f"could not copy the paper's sources and data into a temporary folder to compile them: {error}. "
            f"Nothing was changed; check that the file named can be read and that {tempfile.gettempdir()} "
            "is writable and has room, then build again."
        ) from error
    # Order of the last steps, so that a failure anywhere leaves the snapshot and the PDF as they
    # were: the new snapshot is copied next to the old one and the PDF written to a temporary
    # file next to `out` (nothing visible changes yet); then the snapshot folders are swapped,
    # the old one kept aside; then the PDF is moved into place (leaving atomic_path). If that
    # move fails, the swap is undone; only once the PDF is in place is the old snapshot deleted.
    snapshot = _SnapshotSwap(files, data_dir) if new_snapshot else contextlib.nullcontext()
    try:
        with snapshot, atomic_path(out) as partial:
            partial.write_bytes(pdf)
            if new_snapshot:
                snapshot.swap()
    except OSError as error:
        written = f"the results snapshot {data_dir} or the PDF {out}" if new_snapshot else f"the PDF {out}"
        raise BuildError(
            f"could not write {written}: {error}. Nothing was changed; check that the folder is writable "
            "and the disk has room, then build again."
        ) from error
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="output folder of `lora-lab run` to take results and figures from")
    parser.add_argument(
        "--data-dir", default=str(DEFAULT_DATA_DIR), help="results snapshot folder (default: paper/data)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="PDF to write (default: comentario_LoRA.pdf)")
    parser.add_argument("--date", help="date for the title page (default: today, or SOURCE_DATE_EPOCH's day)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--bench",
        default=AUTO,
        help="benchmark results to quote (default: benchmarks/results/latest.json with --run-dir, "
        "else the snapshot's bench.json)",
    )
    where.add_argument("--no-bench", dest="bench", action="store_const", const=None, help="quote no benchmark figures")
    args = parser.parse_args(argv)
    try:
        path = build(args.run_dir, args.data_dir, args.out, args.date, bench=args.bench)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
