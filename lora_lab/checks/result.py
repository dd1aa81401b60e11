"""What every grader shares: :class:`CheckResult`, the seeded runner and small helpers.

A grader's body is a function ``check(result, *args, generator)`` that records one entry per
property on ``result``; :func:`_run_check` runs it on private random numbers and prints the
report. The helpers word the student's errors and compare numbers the same way in every grader.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import torch

_SEED = 0
DIAGNOSIS_WIDTH = 80  # nbgrader validate shows a traceback's lines cut at about 90 characters, indented by 4

# Both the error's description and CheckResult.fail look for it, so the stub is named the same way
# wherever the student's code raised.
_NOT_WRITTEN = "raised NotImplementedError (the exercise is not written yet)"


@dataclass
class CheckResult:
    """What a check found, in the order it was checked: ``(passed, message, hint)`` entries.

    ``bool(result)`` is True when nothing failed (and something was checked); ``passed`` lists
    the properties that hold and ``failed`` the ``(problem, hint)`` pairs of those that do not.
    """

    name: str
    entries: list[tuple[bool, str, str]] = field(default_factory=list)

    def ok(self, message: str) -> None:
        """Record a property that holds."""
        self.entries.append((True, message, ""))

    def fail(self, problem: str, hint: str) -> None:
        """Record a property that does not hold, with what to do about it."""
        if _NOT_WRITTEN in problem:  # the student's stub: say so before the hint for the finished code
            hint = f"replace `raise NotImplementedError()` with your code; then: {hint}"
        self.entries.append((False, problem, hint))

    @property
    def passed(self) -> list[str]:
        """The messages of the properties that hold."""
        return [message for ok, message, _ in self.entries if ok]

    @property
    def failed(self) -> list[tuple[str, str]]:
        """The ``(problem, hint)`` pairs of the properties that do not hold."""
        return [(message, hint) for ok, message, hint in self.entries if not ok]

    def __bool__(self) -> bool:
        return bool(self.entries) and all(ok for ok, _, _ in self.entries)

    def report(self) -> str:
        """The printed report: every property in order, then a one-line verdict."""
        lines = [f"{self.name}:"]
        for ok, message, hint in self.entries:
            if ok:
                lines.append(f"  ok    {message}")
            else:
                lines += [f"  FAIL  {message}", f"        hint: {hint}"]
        failed, passed = len(self.failed), len(self.passed)
        lines.append(f"{failed} failed, {passed} passed." if failed else f"All {passed} passed.")
        return "\n".join(lines)

    def diagnosis(self) -> str:
        """What failed, each with its hint, in one text: the message for ``assert result, result.diagnosis()``.

        ``nbgrader validate`` shows a failing test's traceback but not what the cell printed, so the
        diagnosis must travel in the assertion message itself; it cuts lines at about 90 characters,
        so long ones are wrapped at :data:`DIAGNOSIS_WIDTH`."""
        if not self.entries:
            return f"{self.name}: nothing was checked"
        lines = [f"{self.name}: {len(self.failed)} of {len(self.entries)} properties fail"]
        wrap = functools.partial(textwrap.fill, width=DIAGNOSIS_WIDTH)
        for problem, hint in self.failed:
            lines.append(wrap(problem, initial_indent="  FAIL  ", subsequent_indent=" " * 8))
            lines.append(wrap(hint, initial_indent="        hint: ", subsequent_indent=" " * 14))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CheckResult({self.name!r}, passed={len(self.passed)}, failed={len(self.failed)})"


@contextmanager
def _private_rng(seed: int = _SEED) -> Iterator[torch.Generator]:
    """Seed the global generator for the student's constructors, restore it afterwards, and hand
    out a private generator for the check's own tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _run_check(title: str, check: Callable[..., None], *args: object) -> CheckResult:
    """Run ``check(result, *args, generator)`` under :func:`_private_rng`, print and return the result."""
    result = CheckResult(title)
    with _private_rng() as generator:
        check(result, *args, generator)
    return _printed(result)


def _printed(result: CheckResult) -> CheckResult:
    print(result.report())
    return result


def _name(subject: object, fallback: str) -> str:
    """The student's function or class by its name, which a callable object may lack."""
    return getattr(subject, "__name__", fallback)


def _title(grader: str, subject: object, fallback: str) -> str:
    """``grader(name of the student's function or class)``, the report's first line."""
    return f"{grader}({_name(subject, fallback)})"


def _describe_error(error: BaseException) -> str:
    """What the student's code raised, as the end of a sentence: ``raised TypeError: …``."""
    if isinstance(error, NotImplementedError):
        return _NOT_WRITTEN
    text = str(error).strip().splitlines()
    return f"raised {type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _attempt(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[str | None, object]:
    """``(None, fn(*args, **kwargs))``, or ``(what it raised, None)``: the student's code may raise
    anything, and a wrong answer is reported, never raised."""
    try:
        return None, fn(*args, **kwargs)
    except Exception as error:
        return _describe_error(error), None


def _shape_or_type(value: object) -> object:
    """A returned tensor's shape, or the name of what came back instead."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _as_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return None


def _is_number(value: object) -> bool:
    # bool is an int, but True is no count of parameters
    return isinstance(value, Real) and not isinstance(value, bool)


def _scalar(value: object) -> object:
    """A one-element tensor as its Python number (what ``.item()`` gives); anything else as it is."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _fmt(number: float) -> str:
    return f"{number:g}"


def _named_mistake(got: object, mistakes: Mapping[object, str], not_a_number: str = "") -> str:
    """``": <what the wrong number means>"`` for a known mistake, ``": <not_a_number>"`` for a
    value that is no number, or ``""`` when nothing more can be said."""
    problem = mistakes.get(got, "") if _is_number(got) else not_a_number
    return f": {problem}" if problem else ""
