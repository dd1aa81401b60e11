"""The notebook series as committed, and lora_lab.notebook_tools (executing and the student build).

nbval (``pytest --nbval``) re-runs each notebook and compares outputs; these tests check what nbval
cannot: that the notebooks are committed executed and clean, that they keep enough outputs checked,
and that the student versions hold no solutions and stop at the first exercise. Kernels are started
for four tests only (a few seconds each).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from nbval.plugin import find_comment_markers, find_metadata_tags

from lora_lab import notebook_tools
from lora_lab.notebook_tools import (
    BEGIN_HIDDEN,
    BEGIN_SOLUTION,
    END_HIDDEN,
    END_SOLUTION,
    execute_notebook,
    main,
    student_version,
    write_student_versions,
)

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_low_rank_math.ipynb",
    "02_lora_layer.ipynb",
    "03_base_pretraining.ipynb",
    "04_lora_finetuning.ipynb",
    "05_comparison.ipynb",
    "06_beyond.ipynb",
    "07_lora_variants.ipynb",
    "08_lora_on_a_real_model.ipynb",
]
EXERCISE_NOTEBOOKS = (
    "01_low_rank_math.ipynb", "02_lora_layer.ipynb", "03_base_pretraining.ipynb", "04_lora_finetuning.ipynb",
    "07_lora_variants.ipynb",
    "08_lora_on_a_real_model.ipynb",
)
MIN_EXERCISES = 5
MARKERS = (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN)
COMMITTED = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
REEXECUTE = "re-execute it with `make notebooks` (python -m lora_lab.notebook_tools execute)"


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[tuple[int, nbformat.NotebookNode]]:
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def _nbval_options(cell: nbformat.NotebookNode) -> dict:
    """The options nbval itself derives from a cell's tags and marker comments (comments win, as in nbval)."""
    options = dict(find_metadata_tags(cell.metadata))
    options.update(find_comment_markers(cell.source))
    return options


def _is_checked(cell: nbformat.NotebookNode) -> bool:
    options = _nbval_options(cell)
    return options.get("check", True) and not options.get("skip", False)


def _is_solution(cell: nbformat.NotebookNode) -> bool:
    return bool(cell.metadata.get("nbgrader", {}).get("solution"))


def _regions(source: str) -> tuple[set[str], set[str]]:
    """(non-blank lines inside solution / hidden-test regions, lines outside them) of one cell."""
    inside, outside, depth = set(), set(), False
    for line in source.splitlines():
        if line.strip().startswith((BEGIN_SOLUTION, BEGIN_HIDDEN)):
            depth = True
        elif line.strip().startswith((END_SOLUTION, END_HIDDEN)):
            depth = False
        elif line.strip():
            (inside if depth else outside).add(line)
    return inside, outside


def _assert_no_solution_text(teacher: nbformat.NotebookNode, student: nbformat.NotebookNode) -> None:
    nbformat.validate(student)
    assert len(student.cells) == len(teacher.cells)
    for index, (original, handed_out) in enumerate(zip(teacher.cells, student.cells)):
        secret, public = _regions(original.source)
        if _is_solution(original) and not secret:  # a solution cell without markers is all solution
            secret, public = _regions(f"{BEGIN_SOLUTION}\n{original.source}\n{END_SOLUTION}")
        leaked = (secret - public) & set(handed_out.source.splitlines())
        assert not leaked, f"cell {index} of the student version still holds solution lines {sorted(leaked)}"
        assert not any(marker in handed_out.source for marker in MARKERS), f"cell {index} still holds a marker"
        if handed_out.cell_type == "code":
            assert handed_out.outputs == [] and handed_out.execution_count is None, f"cell {index} keeps outputs"
    assert "widgets" not in student.metadata


def _run_until_error(nb: nbformat.NotebookNode, cwd: Path) -> tuple[CellExecutionError, int]:
    """Execute ``nb`` in place; return the error it must raise and the index of the failing cell."""
    failing = {}
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        on_cell_error=lambda cell, cell_index, execute_reply: failing.setdefault("index", cell_index),
    )
    with pytest.raises(CellExecutionError) as caught:
        client.execute()
    return caught.value, failing["index"]


def _assert_nothing_ran_after(nb: nbformat.NotebookNode, index: int) -> None:
    for later, cell in _code_cells(nb):
        if later > index:
            assert cell.execution_count is None and not cell.outputs, f"cell {later} ran after the failing cell"


# --- the committed series --------------------------------------------------------------------------


def test_the_notebooks_exist_numbered_in_order():
    assert [p.name for p in COMMITTED] == EXPECTED


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_notebook_is_committed_executed_top_to_bottom(path):
    nb = _read(path)
    code = [(i, c) for i, c in _code_cells(nb) if c.source.strip()]
    counts = [c.execution_count for _, c in code]
    # One fresh kernel, top to bottom, numbers every non-empty code cell 1, 2, 3, ...
    assert counts == list(range(1, len(code) + 1)), f"{path.name} has execution counts {counts}: {REEXECUTE}"
    assert any(c.outputs for _, c in code), f"{path.name} has no outputs at all: {REEXECUTE}"
    for index, cell in _code_cells(nb):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors or _nbval_options(cell).get("check_exception"), (
            f"{path.name} cell {index} holds an error ({errors[0].ename}) but is not marked NBVAL_RAISES_EXCEPTION"
        )


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_notebook_metadata_is_clean(path):
    nb = _read(path)
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state: {REEXECUTE}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"
    timed = [i for i, cell in enumerate(nb.cells) if "execution" in cell.metadata]
    assert not timed, f"{path.name} cells {timed} hold execution timestamps: {REEXECUTE}"
    # JupyterLab adds the kernel's language_info (its Python version included) on its first save: a notebook
    # committed without it shows as changed as soon as someone opens it (tests/test_browser.py checks the bytes).
    assert nb.metadata.get("language_info", {}).get("version"), f"{path.name} lacks language_info.version: {REEXECUTE}"


RAW_WIDGET = re.compile(r"\b(interactive|[A-Z]\w*Box|IntSlider|IntProgress|FloatProgress)\(")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_outputs_show_nothing_broken(path):
    """What a reader sees without a live kernel: no widget's raw repr and no progress bar frozen at 0%."""
    for index, cell in _code_cells(_read(path)):
        for output in cell.outputs:
            data = output.get("data", {})
            text = output.get("text", "") + str(data.get("text/plain", ""))
            if "application/vnd.jupyter.widget-view+json" in data:
                assert "image/png" in data, f"{path.name} cell {index}: a widget output without a still picture"
            assert not RAW_WIDGET.search(text), f"{path.name} cell {index} shows a widget's raw repr: {text[:80]!r}"
            assert "0%|" not in text, f"{path.name} cell {index} shows a progress bar frozen at 0%"


def _grade_ids(nb: nbformat.NotebookNode) -> list[tuple[dict, nbformat.NotebookNode]]:
    return [(cell.metadata["nbgrader"], cell) for cell in nb.cells if "nbgrader" in cell.metadata]


@pytest.mark.parametrize("name", EXERCISE_NOTEBOOKS)
def test_exercises_are_numbered_across_the_series_and_their_tests_cannot_be_fooled(name):
    """README's rule: grade ids are ``exNN_setup`` (the locked setup cell), ``exNN_k_<what>`` (exercise NN.k)
    and ``exNN_k_<what>_test``; a test cell is locked and its hidden part grades with a freshly imported
    lora_lab.checks.grading, whose failures carry the diagnosis."""
    nb = _read(NOTEBOOK_DIR / name)
    number = name[:2]
    cells = _grade_ids(nb)
    setup = [cell for grader, cell in cells if grader["grade_id"] == f"ex{number}_setup"]
    assert setup and setup[0] is next(c for c in nb.cells if c.cell_type == "code"), f"{name}: lock the setup cell"
    assert setup[0].metadata["nbgrader"]["locked"]
    for grader, cell in cells:
        grade_id = grader["grade_id"]
        assert re.fullmatch(rf"ex{number}_(setup|\d+_[a-z]+(_test)?)", grade_id), f"{name}: grade id {grade_id}"
        if grader.get("grade"):
            assert grader["locked"] and grade_id.endswith("_test"), f"{name}: {grade_id} must be a locked test"
            hidden = cell.source.split(BEGIN_HIDDEN)[-1]
            assert "sys.modules" in hidden and "lora_lab.checks.grading import grade" in hidden, grade_id
            assert "result.diagnosis()" in cell.source.split(BEGIN_HIDDEN)[0], grade_id


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_at_least_half_of_the_outputs_are_checked(path):
    with_outputs = [c for _, c in _code_cells(_read(path)) if c.outputs]
    checked = [c for c in with_outputs if _is_checked(c)]
    assert 2 * len(checked) >= len(with_outputs), (
        f"{path.name}: only {len(checked)} of {len(with_outputs)} cells with outputs are compared by nbval"
    )


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_each_ignored_cell_is_followed_by_a_checked_cell(path):
    code = _code_cells(_read(path))
    for position, (index, cell) in enumerate(code):
        if _nbval_options(cell).get("check", True):
            continue
        following = code[position + 1][1] if position + 1 < len(code) else None
        assert following is not None and following.source.strip() and _is_checked(following), (
            f"{path.name} cell {index} is NBVAL_IGNORE_OUTPUT; the next code cell must check a robust fact about it"
        )
        # A fact is stated in words: a cell that only draws a figure checks nothing a reader can see.
        stated = [o for o in following.outputs if o.output_type == "stream" and o.name == "stdout" and o.text.strip()]
        assert stated, f"{path.name} cell {index} is NBVAL_IGNORE_OUTPUT; the next code cell prints no fact about it"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_nbgrader_cells_are_well_formed(path):
    nb = _read(path)
    student_version(nb, path.name)  # raises on unbalanced markers, naming the cell
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), f"{path.name}: nbgrader grade_ids repeat: {ids}"
    for index, cell in enumerate(nb.cells):
        grader = cell.metadata.get("nbgrader", {})
        if BEGIN_SOLUTION in cell.source:
            assert grader.get("solution"), f"{path.name} cell {index} has solution markers but no solution metadata"
        if BEGIN_HIDDEN in cell.source:
            assert grader.get("grade"), f"{path.name} cell {index} has hidden tests but is not a graded cell"


def test_there_are_enough_exercises():
    counts = {}
    for name in EXERCISE_NOTEBOOKS:
        path = NOTEBOOK_DIR / name
        assert path.is_file(), f"{name} is missing"
        counts[name] = sum(_is_solution(cell) for cell in _read(path).cells)
    assert all(counts.values()) and sum(counts.values()) >= MIN_EXERCISES, f"exercises per notebook: {counts}"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_student_version_holds_no_solution(path):
    nb = _read(path)
    _assert_no_solution_text(nb, student_version(nb, path.name))


def test_student_version_of_notebook_01_stops_at_its_first_exercise(tmp_path, monkeypatch):
    source = NOTEBOOK_DIR / EXERCISE_NOTEBOOKS[0]
    if not source.is_file():
        pytest.skip(f"{source.name} is not written yet (test_the_six_notebooks_exist_numbered_in_order fails)")
    monkeypatch.setenv("LORA_LAB_PROFILE", "smoke")  # the kernel inherits it; 01 should not train, but just in case
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / source.name).write_bytes(source.read_bytes())
    (written,) = write_student_versions(tmp_path / "src", tmp_path / "student")
    nb = _read(written)
    first = next(i for i, cell in enumerate(nb.cells) if _is_solution(cell))
    graded = [i for i, cell in enumerate(nb.cells) if i > first and cell.metadata.get("nbgrader", {}).get("grade")]
    first_test = graded[0] if graded else first
    error, index = _run_until_error(nb, tmp_path)
    assert index in (first, first_test), f"the student version failed at cell {index}, not at exercise cell {first}"
    # The stub's NotImplementedError either ends the run itself, or a lora_lab.checks checker catches it, reports it
    # ("raised NotImplementedError (the exercise is not written yet)") and the test cell's assert fails.
    printed = "".join(output.get("text", "") for output in nb.cells[index].outputs)
    assert error.ename == "NotImplementedError" or (
        error.ename == "AssertionError" and "NotImplementedError" in printed
    ), f"cell {index} failed with {error.ename}: {error.evalue}, not because of the exercise's stub"
    _assert_nothing_ran_after(nb, index)


# --- the student build on a small notebook written here ----------------------------------------------


def _graded(cell: nbformat.NotebookNode, grade_id: str, *, solution: bool) -> nbformat.NotebookNode:
    cell.metadata["nbgrader"] = {
        "grade": not solution, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
        "solution": solution, "task": False, **({} if solution else {"points": 1}),
    }  # fmt: skip
    return cell


def _executed(cell: nbformat.NotebookNode, count: int, text: str) -> nbformat.NotebookNode:
    cell.execution_count = count
    cell.outputs = [new_output("stream", name="stdout", text=text)]
    return cell


def _exercise_notebook() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    nb.cells = [
        new_markdown_cell("# Circles"),
        _executed(new_code_cell("import math\nprint('ready')"), 1, "ready\n"),
        _graded(
            _executed(
                new_code_cell(
                    "def area(radius):\n"
                    '    """The area of a circle."""\n'
                    f"    {BEGIN_SOLUTION}\n"
                    "    squared = radius**2\n"
                    "    return math.pi * squared\n"
                    f"    {END_SOLUTION}\n"
                    "print('defined')"
                ),
                2,
                "defined\n",
            ),
            "area_sol",
            solution=True,
        ),
        _graded(
            new_code_cell(
                "assert abs(area(1.0) - math.pi) < 1e-12\n"
                f"{BEGIN_HIDDEN}\n"
                "assert area(0.0) == 0.0\n"
                f"{END_HIDDEN}\n"
                "print('passed')"
            ),
            "area_test",
            solution=False,
        ),
        _graded(
            new_markdown_cell(
                f"Why r²?\n\n{BEGIN_SOLUTION}\nScaling a shape by r scales its area by r².\n{END_SOLUTION}"
            ),
            "why_sol",
            solution=True,
        ),
        _graded(new_code_cell("CONSTANT = 1.5"), "const_sol", solution=True),  # no markers: all solution
        _executed(new_code_cell("print('after the exercise')"), 4, "after the exercise\n"),
    ]
    nb.cells[3] = _executed(nb.cells[3], 3, "passed\n")
    return nb


def test_student_build_replaces_solutions_and_removes_hidden_tests(tmp_path):
    teacher = _exercise_notebook()
    (tmp_path / "src").mkdir()
    nbformat.write(teacher, tmp_path / "src" / "exercise.ipynb")
    (tmp_path / "src" / "notes.txt").write_text("not a notebook")
    assert main(["student", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["exercise.ipynb"]  # nothing else is copied
    student = _read(tmp_path / "out" / "exercise.ipynb")
    _assert_no_solution_text(teacher, student)
    sources = [cell.source for cell in student.cells]
    assert sources[2] == (
        'def area(radius):\n    """The area of a circle."""\n    # YOUR CODE HERE\n    raise NotImplementedError()\n'
        "print('defined')"
    )
    assert sources[3] == "assert abs(area(1.0) - math.pi) < 1e-12\nprint('passed')"
    assert sources[4] == "Why r²?\n\nYOUR ANSWER HERE"
    assert sources[5] == "# YOUR CODE HERE\nraise NotImplementedError()"
    assert sources[:2] + sources[6:] == [cell.source for cell in teacher.cells[:2] + teacher.cells[6:]]
    assert student.cells[2].metadata["nbgrader"] == teacher.cells[2].metadata["nbgrader"]  # nbgrader still grades it


def test_student_version_stops_at_the_first_exercise(tmp_path):
    student = student_version(_exercise_notebook(), "exercise")
    error, index = _run_until_error(student, tmp_path)
    assert error.ename == "NotImplementedError"
    assert index == 3  # area() is defined with a stub body; its test cell is where it raises
    assert student.cells[2].outputs[0].text == "defined\n"  # the code outside the markers ran
    _assert_nothing_ran_after(student, index)


@pytest.mark.parametrize(
    "source, problem",
    [
        (f"x = 1\n{BEGIN_SOLUTION}\nx = 2", "never closed"),
        (f"{END_SOLUTION}\nx = 2", "without a"),
        (f"{BEGIN_SOLUTION}\n{BEGIN_SOLUTION}\nx = 2\n{END_SOLUTION}", "line 2 opens"),
        (f"assert True\n{BEGIN_HIDDEN}\nassert x", "never closed"),
    ],
    ids=["unclosed", "end-first", "nested", "unclosed-hidden"],
)
def test_unbalanced_markers_name_the_file_and_cell(source, problem, tmp_path):
    nb = new_notebook(cells=[new_markdown_cell("intro"), new_code_cell(source)])
    (tmp_path / "src").mkdir()
    nbformat.write(nb, tmp_path / "src" / "broken.ipynb")
    with pytest.raises(ValueError, match=problem) as caught:
        write_student_versions(tmp_path / "src", tmp_path / "out")
    assert "broken.ipynb: cell 1" in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written


# --- executing in place --------------------------------------------------------------------------------


def test_execute_writes_outputs_and_clean_metadata(tmp_path):
    nb = new_notebook(
        cells=[
            new_code_cell("from pathlib import Path\nprint(Path.cwd().name)"),
            new_code_cell("# NBVAL_RAISES_EXCEPTION\nraise ValueError('meant to fail')"),
            new_code_cell(""),
            new_code_cell("6 * 7"),
        ]
    )
    nb.metadata["widgets"] = {"state": {}}
    folder = tmp_path / "lesson"
    folder.mkdir()
    nbformat.write(nb, folder / "n.ipynb")
    execute_notebook(folder / "n.ipynb")
    done = _read(folder / "n.ipynb")
    assert [c.execution_count for c in done.cells] == [1, 2, None, 3]
    assert done.cells[0].outputs[0].text == "lesson\n"  # ran in the notebook's folder
    assert done.cells[1].outputs[0].ename == "ValueError"
    assert done.cells[3].outputs[0].data["text/plain"] == "42"
    assert "widgets" not in done.metadata and done.metadata.kernelspec.name == "python3"
    assert all(c.metadata == {} for c in done.cells)  # no timestamps, and the borrowed tag is gone again


def test_failed_execution_leaves_the_notebook_unchanged_and_names_the_cell(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell("intro"), new_code_cell("x = 1"), new_code_cell("raise KeyError('x')")])
    nbformat.write(nb, tmp_path / "n.ipynb")
    before = (tmp_path / "n.ipynb").read_bytes()
    with pytest.raises(RuntimeError, match=r"n\.ipynb: cell 2 \(\"raise KeyError\('x'\)\"\) failed: KeyError"):
        execute_notebook(tmp_path / "n.ipynb")
    assert (tmp_path / "n.ipynb").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["n.ipynb"]  # no temporary file left behind


def test_a_slider_cell_gets_the_short_timeout(tmp_path, monkeypatch):
    """A cell building an interact() slider may run WIDGET_CELL_TIMEOUT seconds (nbclient sometimes waits
    for one until its timeout); other cells keep the long one. Shown with a 1-second limit and a cell
    that names interact( but sleeps for 5."""
    monkeypatch.setattr(notebook_tools, "WIDGET_CELL_TIMEOUT", 1)
    cells = [new_code_cell("import time\ntime.sleep(1.5)"), new_code_cell("# interact(\ntime.sleep(5)")]
    nb = new_notebook(cells=cells)
    nbformat.write(nb, tmp_path / "n.ipynb")
    message = r"n\.ipynb: cell 1 \('# interact\('\) failed: CellTimeoutError.* after 1 seconds"
    with pytest.raises(RuntimeError, match=message):
        execute_notebook(tmp_path / "n.ipynb", timeout=30)


def test_execute_drops_closed_widgets_and_keeps_what_jupyterlab_writes(tmp_path):
    """A tqdm bar with leave=False closes its widget: its output is dropped (saved, it would show a bar frozen at
    its first frame). A widget still open stays. language_info keeps the kernel's version, as JupyterLab saves it."""
    nb = new_notebook(
        cells=[
            new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), leave=False):\n    pass\nprint('done')"),
            new_code_cell("import ipywidgets\nipywidgets.IntSlider()"),
        ]
    )
    nbformat.write(nb, tmp_path / "n.ipynb")
    execute_notebook(tmp_path / "n.ipynb")
    done = _read(tmp_path / "n.ipynb")
    assert [o.output_type for o in done.cells[0].outputs] == ["stream"]
    assert done.cells[0].outputs[0].text == "done\n"
    assert "application/vnd.jupyter.widget-view+json" in done.cells[1].outputs[0].data
    assert done.metadata.language_info.version.count(".") == 2  # e.g. 3.11.7
