"""Keep the notebooks runnable and hand them out.

``python -m lora_lab.notebook_tools execute [PATHS...]`` re-runs notebooks in place on a fresh
kernel (default: every ``notebooks/*.ipynb``, in order), so their committed outputs are the ones
``pytest --nbval`` compares against. A notebook that fails is left exactly as it was. It is saved
with the metadata JupyterLab writes (the kernel's ``language_info``, its ``version`` included), so
opening it in JupyterLab leaves git clean; outputs of widgets closed during the run (progress bars
with ``leave=False``) are dropped, as they are gone from a live screen too.

``python -m lora_lab.notebook_tools student SRC_DIR OUT_DIR`` writes the student versions: the
code between nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` lines becomes
``raise NotImplementedError()``, hidden tests disappear and every output is cleared. It is a quick
preview: it writes none of nbgrader's checksums and locks, so a course hands out what
``nbgrader generate_assignment`` writes (README, "The classroom").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, CellExecutionError, DeadKernelError

from .files import atomic_write_text

__all__ = ["execute_notebook", "student_version", "write_student_versions", "notebook_paths", "main"]

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub for Python
TEXT_STUB = ("YOUR ANSWER HERE",)  # nbgrader's stub for markdown answers
CELL_TIMEOUT = 1800  # seconds per cell: the slowest training cell takes minutes on 2 cores; this only catches hangs
# A cell that builds an interact() slider draws one figure in well under a second, but nbclient 0.11 with
# ipywidgets 8 now and then waits for it until the cell's timeout and then goes on as if nothing had happened
# (measured here: 1 run in 5). A short timeout bounds that wait instead of stalling `make notebooks` for 30 min.
WIDGET_CELL_TIMEOUT = 120
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
RAISES = "raises-exception"  # the cell tag that nbclient and nbval both read as "this cell is meant to fail"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def notebook_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The notebooks named by ``paths``: files as given, folders as their ``*.ipynb`` in name order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.glob("*.ipynb")))
        elif path.suffix == ".ipynb" and path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a notebook (.ipynb file) nor a folder of notebooks")
    return found


def _normalise(nb: nbformat.NotebookNode) -> None:
    """Drop what changes on every run or machine but is not output, so diffs show only real changes."""
    nb.metadata.pop("widgets", None)  # widget state: large, random model ids, useless without a live kernel
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    # language_info stays as the kernel reported it, version included: JupyterLab writes exactly that on
    # its first save, so a notebook saved without it shows as changed as soon as someone opens it.
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps (nbclient's record_timing)


class _Client(NotebookClient):
    """nbclient, noting which widgets (comms) the kernel closed during the run."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.closed_widgets: set[str] = set()

    def handle_comm_msg(self, outs: list, msg: dict, cell_index: int) -> None:
        if msg["msg_type"] == "comm_close":
            self.closed_widgets.add(msg["content"].get("comm_id", ""))
        super().handle_comm_msg(outs, msg, cell_index)


def _drop_closed_widgets(nb: nbformat.NotebookNode, closed: set[str]) -> None:
    """Remove the display outputs of widgets closed during the run (a tqdm bar with ``leave=False``): saved,
    they would show as a bar frozen at its first frame, above the finished results."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            kept = [o for o in cell.outputs if o.get("data", {}).get(WIDGET_VIEW, {}).get("model_id") not in closed]
            cell.outputs = kept


def _write(path: Path, nb: nbformat.NotebookNode) -> None:
    nbformat.validate(nb)
    atomic_write_text(path, nbformat.writes(nb) + "\n")  # nbformat.write adds the same final newline


def _cell_timeout(cell: nbformat.NotebookNode, timeout: int) -> int:
    """The seconds ``cell`` may run: ``timeout``, or less for a cell that only builds a slider."""
    return min(timeout, WIDGET_CELL_TIMEOUT) if "interact(" in cell.source else timeout


def _is_marked_to_raise(cell: nbformat.NotebookNode) -> bool:
    lines = (line.strip() for line in cell.source.splitlines())
    return any(line.startswith("#") and line.lstrip("#").strip() == "NBVAL_RAISES_EXCEPTION" for line in lines)


def execute_notebook(path: str | Path, *, timeout: int = CELL_TIMEOUT) -> None:
    """Run the notebook at ``path`` top to bottom on a fresh ``python3`` kernel whose working
    directory is the notebook's folder, and save it with its new outputs, atomically.

    Raises ``RuntimeError`` naming the failing cell (index and first line); the file is then unchanged.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    # nbclient honours the raises-exception tag only; give cells marked by nbval's comment the tag while running.
    borrowed = [c for c in nb.cells if _is_marked_to_raise(c) and RAISES not in c.metadata.get("tags", [])]
    for cell in borrowed:
        cell.metadata.setdefault("tags", []).append(RAISES)
    current = {"index": None}
    client = _Client(
        nb,
        timeout=timeout,
        timeout_func=lambda cell: _cell_timeout(cell, timeout),
        kernel_name="python3",
        record_timing=False,
        # True, although the state is stripped afterwards: with False, nbclient 0.11 fails with a KeyError
        # when an interact() slider's output arrives (output_widget.py).
        store_widget_state=True,
        resources={"metadata": {"path": str(path.parent.resolve())}},
        on_cell_start=lambda cell, cell_index: current.update(index=cell_index),
    )
    try:
        client.execute()
    except (CellExecutionError, CellControlSignal, DeadKernelError, TimeoutError) as error:
        index = current["index"]
        where = "the kernel's start"
        if index is not None:
            where = f"cell {index} ({(nb.cells[index].source.strip().splitlines() or [''])[0]!r})"
        ename = getattr(error, "ename", None)  # CellExecutionError carries the kernel's exception name and value
        summary = f"{ename}: {error.evalue}" if ename else f"{type(error).__name__}: {error}"
        raise RuntimeError(
            f"{path}: {where} failed: {summary}. The notebook was left unchanged; fix the cell (or its code in "
            "lora_lab) and execute again"
        ) from error
    for cell in borrowed:
        cell.metadata["tags"].remove(RAISES)
        if not cell.metadata["tags"]:
            del cell.metadata["tags"]
    _drop_closed_widgets(nb, client.closed_widgets)
    _normalise(nb)
    _write(path, nb)


def _replace_regions(lines: list[str], begin: str, end: str, stub: tuple[str, ...], where: str) -> list[str]:
    """Replace every ``begin``…``end`` region (marker lines included) by ``stub`` at the begin line's indentation."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(lines, 1):
        marker = line.strip()
        if marker.startswith(begin):
            if inside:
                raise ValueError(f"{where}: line {number} opens '{begin}' again before '{end}'")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in stub)
        elif marker.startswith(end):
            if not inside:
                raise ValueError(f"{where}: line {number} has '{end}' without a '{begin}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{begin}' is never closed by '{end}'")
    return out


def student_version(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """A student copy of ``nb``: solutions replaced by stubs, hidden tests removed, outputs cleared.

    Raises ``ValueError`` naming ``name`` and the cell index when markers are unbalanced.
    """
    student = nbformat.from_dict(nb)  # a deep copy
    student.metadata.pop("widgets", None)
    for index, cell in enumerate(student.cells):
        where = f"{name}: cell {index}"
        stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
        lines = cell.source.splitlines()
        kept = _replace_regions(lines, BEGIN_SOLUTION, END_SOLUTION, stub, where)
        if kept == lines and cell.metadata.get("nbgrader", {}).get("solution"):
            kept = list(stub)  # a solution cell without markers is all solution (as nbgrader treats it)
        kept = _replace_regions(kept, BEGIN_HIDDEN, END_HIDDEN, (), where)
        cell.source = "\n".join(kept)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(student)
    return student


def write_student_versions(source_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the student version of every ``source_dir/*.ipynb`` to ``out_dir`` (nothing else is copied).

    Every notebook is converted before any is written, so an error leaves ``out_dir`` untouched.
    """
    sources = sorted(Path(source_dir).glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {source_dir}")
    converted = [(p.name, student_version(nbformat.read(p, as_version=4), str(p))) for p in sources]
    written = []
    for name, nb in converted:
        _write(Path(out_dir) / name, nb)
        written.append(Path(out_dir) / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.notebook_tools", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("execute", help="re-execute notebooks in place (outputs are committed for nbval)")
    run.add_argument("paths", nargs="*", default=["notebooks"], help="notebooks or folders (default: notebooks)")
    run.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds allowed per cell")
    handout = commands.add_parser(
        "student",
        help="preview student versions (solutions removed, outputs cleared; no nbgrader checksums or locks: "
        "a course hands out what nbgrader generate_assignment writes)",
    )
    handout.add_argument("source_dir")
    handout.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "student":
            for path in write_student_versions(args.source_dir, args.out_dir):
                print(f"wrote {path}")
            return 0
        paths = notebook_paths(args.paths)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not paths:
        print(f"error: no notebooks found in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    failed = []
    for path in paths:
        print(f"executing {path} ...", flush=True)
        try:
            execute_notebook(path, timeout=args.timeout)
        except RuntimeError as error:
            print(f"{error.__cause__}\nerror: {error}", file=sys.stderr, flush=True)  # the cell's traceback first
            failed.append(path)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
