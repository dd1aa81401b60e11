"""The classroom round trip with nbgrader's own commands, as README's classroom section tells a teacher.

A course folder gets classroom/nbgrader_config.py and notebooks 01, 02 and 04 as three assignments;
``nbgrader generate_assignment`` writes the student versions; submissions are graded by ``nbgrader
autograde`` and get feedback from ``nbgrader generate_feedback``. The submissions: the teacher's
solutions (full marks), the release unchanged (zero), and notebook 02 with the typical mistakes of
exercise 02.1 (the course's (in, r) layout of A, the scaling left out, B initialised at random, an empty
layer with the checker rebound to ``lambda *a, **k: True``), each of which must lose exactly that
exercise's point and keep the two others (the wrapper is graded on lora_lab's layer, not theirs).

The graded runs use the smoke profile (set by the course config), so notebook 04 trains in seconds even
with an empty cache. nbgrader shells out to ``alembic``: the venv's bin/ goes first on PATH.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lora_lab.notebook_tools import BEGIN_SOLUTION, END_SOLUTION

nbgrader_api = pytest.importorskip("nbgrader.api", reason="nbgrader is a test dependency: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSIGNMENTS = {"01_low_rank_math": 2, "02_lora_layer": 5, "04_lora_finetuning": 2}  # points each
LAYER_SOLUTION = "ex02_1_layer"
LAYER_TEST = "ex02_1_layer_test"
APPLY_SOLUTION = "ex02_4_apply"
# Exercise 02.4's typical mistake (the original adapted in place), with a phrase its feedback must show.
APPLY_MISTAKE = ("adapted = copy.deepcopy(model)", "adapted = model", "fn returned the model it was given")
TESTS_02 = ("ex02_1_layer_test", "ex02_2_linear_test", "ex02_3_count_test", "ex02_4_apply_test", "ex02_5_merge_test")

# Exercise 02.1's typical mistakes, as edits of the solution's code; each with a phrase its feedback must show.
MISTAKES = {
    "seed_layout": (  # A shaped (in, r) and B (r, out), as the course wrote them
        [
            ("torch.randn(rank, in_features) * 0.01", "torch.randn(in_features, rank) * 0.01"),
            ("torch.zeros(out_features, rank)", "torch.zeros(rank, out_features)"),
            ("(x @ self.lora_A.T) @ self.lora_B.T * self.scaling", "x @ self.lora_A @ self.lora_B * self.scaling"),
        ],
        "it is transposed (the course",
    ),
    "no_scaling": (
        [("(x @ self.lora_A.T) @ self.lora_B.T * self.scaling", "(x @ self.lora_A.T) @ self.lora_B.T")],
        "is not scaled",
    ),
    "random_b": (
        [("torch.zeros(out_features, rank)", "torch.randn(out_features, rank)")],
        "lora_B is not zero at init",
    ),
}
REBOUND = (  # an empty layer, and the name the visible test calls rebound to a checker that always passes
    "class LoRALayer(nn.Module):\n"
    "    def __init__(self, in_features, out_features, rank=4, alpha=1.0):\n"
    "        super().__init__()\n\n"
    "    def forward(self, x):\n"
    "        return x\n\n\n"
    "check_lora_layer = lambda *args, **kwargs: True  # noqa: E731\n"
)


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORA_LAB_PROFILE"}  # the course config decides
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # nbgrader runs `alembic` by name
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),  # kernels import this tree
        JUPYTER_CONFIG_DIR=str(course / ".jupyter"),  # no user-wide nbgrader config leaks in
    )
    done = subprocess.run(
        [str(BIN / "nbgrader"), *args], cwd=course, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _without_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if line.strip() not in (BEGIN_SOLUTION, END_SOLUTION))


def _filled(release: nbformat.NotebookNode, teacher: nbformat.NotebookNode, **replaced: str) -> nbformat.NotebookNode:
    """The release with every solution cell holding the teacher's code (markers dropped), except the
    cells named in ``replaced`` (grade_id -> source)."""
    solutions = {c.metadata["nbgrader"]["grade_id"]: c.source for c in teacher.cells if "nbgrader" in c.metadata}
    submission = nbformat.from_dict(release)
    for cell in submission.cells:
        grader = cell.metadata.get("nbgrader", {})
        if grader.get("solution"):
            cell.source = replaced.get(grader["grade_id"], _without_markers(solutions[grader["grade_id"]]))
    return submission


def _submit(course: Path, student: str, assignment: str, nb: nbformat.NotebookNode) -> None:
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True)
    nbformat.write(nb, folder / f"{assignment}.ipynb")


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A course folder after generate_assignment, submissions, autograde and generate_feedback."""
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "classroom" / "nbgrader_config.py", course)
    for assignment in ASSIGNMENTS:
        (course / "source" / assignment).mkdir(parents=True)
        shutil.copy(ROOT / "notebooks" / f"{assignment}.ipynb", course / "source" / assignment)
        _nbgrader(course, "generate_assignment", assignment, "--force")
    for assignment in ASSIGNMENTS:
        teacher = nbformat.read(course / "source" / assignment / f"{assignment}.ipynb", as_version=4)
        release = nbformat.read(course / "release" / assignment / f"{assignment}.ipynb", as_version=4)
        _submit(course, "solution", assignment, _filled(release, teacher))
        _submit(course, "release", assignment, release)
    teacher = nbformat.read(course / "source" / "02_lora_layer" / "02_lora_layer.ipynb", as_version=4)
    release = nbformat.read(course / "release" / "02_lora_layer" / "02_lora_layer.ipynb", as_version=4)
    layer = _without_markers(next(c.source for c in teacher.cells if _grade_id(c) == LAYER_SOLUTION))
    for student, (edits, _) in MISTAKES.items():
        wrong = layer
        for old, new in edits:
            assert old in wrong, f"the solution of {LAYER_SOLUTION} no longer contains {old!r}: update MISTAKES"
            wrong = wrong.replace(old, new)
        _submit(course, student, "02_lora_layer", _filled(release, teacher, **{LAYER_SOLUTION: wrong}))
    _submit(course, "rebound", "02_lora_layer", _filled(release, teacher, **{LAYER_SOLUTION: REBOUND}))
    apply = _without_markers(next(c.source for c in teacher.cells if _grade_id(c) == APPLY_SOLUTION))
    assert APPLY_MISTAKE[0] in apply, f"the solution of {APPLY_SOLUTION} no longer contains {APPLY_MISTAKE[0]!r}"
    wrong_apply = apply.replace(APPLY_MISTAKE[0], APPLY_MISTAKE[1])
    _submit(course, "no_deepcopy", "02_lora_layer", _filled(release, teacher, **{APPLY_SOLUTION: wrong_apply}))
    for assignment in ASSIGNMENTS:
        _nbgrader(course, "autograde", assignment, "--force")
        _nbgrader(course, "generate_feedback", assignment, "--force")
    return course


def _grade_id(cell: nbformat.NotebookNode) -> str:
    return cell.metadata.get("nbgrader", {}).get("grade_id", "")


def _scores(course: Path, assignment: str, student: str) -> tuple[float, float, dict[str, float]]:
    with nbgrader_api.Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission_notebook(assignment, assignment, student)
        per_cell = {grade.name: grade.score for grade in submission.grades}
        return submission.score, submission.max_score, per_cell


def _feedback(course: Path, student: str, assignment: str) -> str:
    return html.unescape((course / "feedback" / student / assignment / f"{assignment}.html").read_text())


def test_release_is_what_generate_assignment_promises(course):
    for assignment in ASSIGNMENTS:
        release = nbformat.read(course / "release" / assignment / f"{assignment}.ipynb", as_version=4)
        text = "\n".join(cell.source for cell in release.cells)
        assert BEGIN_SOLUTION not in text and "BEGIN HIDDEN TESTS" not in text and "_grade(" not in text
        locked = [_grade_id(c) for c in release.cells if c.metadata.get("nbgrader", {}).get("locked")]
        assert f"ex{assignment[:2]}_setup" in locked, f"{assignment}: the setup cell must be locked"
        assert all(gid.startswith(f"ex{assignment[:2]}_") for gid in map(_grade_id, release.cells) if gid)
        assert all("checksum" in c.metadata["nbgrader"] for c in release.cells if _grade_id(c) in locked)


@pytest.mark.parametrize("assignment", list(ASSIGNMENTS))
def test_solutions_score_full_marks_and_the_release_zero(course, assignment):
    score, max_score, per_cell = _scores(course, assignment, "solution")
    assert max_score == ASSIGNMENTS[assignment] and score == max_score, per_cell
    score, _, per_cell = _scores(course, assignment, "release")
    assert score == 0, per_cell


@pytest.mark.parametrize("student", [*MISTAKES, "rebound"])
def test_a_mistake_in_the_layer_costs_that_exercise_only(course, student):
    score, max_score, per_cell = _scores(course, "02_lora_layer", student)
    assert per_cell == {test: int(test != LAYER_TEST) for test in TESTS_02}, per_cell
    assert (score, max_score) == (4, 5)


def test_a_mistake_in_apply_costs_that_exercise_only_and_is_diagnosed(course):
    score, max_score, per_cell = _scores(course, "02_lora_layer", "no_deepcopy")
    assert per_cell == {test: int(test != "ex02_4_apply_test") for test in TESTS_02}, per_cell
    assert (score, max_score) == (4, 5)
    feedback = _feedback(course, "no_deepcopy", "02_lora_layer")
    assert APPLY_MISTAKE[2] in feedback and "hint: " in feedback


@pytest.mark.parametrize("student", list(MISTAKES))
def test_feedback_shows_the_diagnosis_and_a_hint(course, student):
    feedback = _feedback(course, student, "02_lora_layer")
    assert MISTAKES[student][1] in feedback and "hint: " in feedback


def test_a_rebound_checker_is_caught_by_the_hidden_test(course):
    feedback = _feedback(course, "rebound", "02_lora_layer")
    assert "has no attribute lora_A" in feedback and "hint: " in feedback


def test_validate_shows_the_student_the_diagnosis(course):
    """``nbgrader validate`` prints a failing test's traceback, not what the cell printed: the diagnosis
    must be in the assertion message."""
    submission = course / "submitted" / "seed_layout" / "02_lora_layer" / "02_lora_layer.ipynb"
    shown = _nbgrader(course, "validate", str(submission)).stdout
    assert "VALIDATION FAILED" in shown and "lora_A has shape (12, 3) = (in_features, rank): it is transposed" in shown
    # validate cuts long lines ("…"): the diagnosis is wrapped so that its hints arrive whole
    assert "hint: A is r × k in the paper" in shown and "(3, 12); then ΔW = B A" in shown
