"""Argument checks for the public API, written once.

Each returns the value in its plain Python type (a NumPy integer becomes ``int``) or raises
``ValueError`` (``TypeError`` for flags) whose message names the argument and what it got.
``bool`` is refused where a number is expected: ``True`` is an ``int`` to Python, never a rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

__all__ = ["check_positive_int", "check_positive_real", "check_fraction", "check_flag", "passes"]


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_positive_real(name: str, value: object) -> float:
    """``value`` as a finite ``float`` > 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_fraction(name: str, value: object) -> float:
    """``value`` as a ``float`` in [0, 1) (a dropout probability, say)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``: ``bool("no")`` would silently be True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def passes(check: Callable[[str, object], object], value: object) -> bool:
    """Whether ``check`` accepts ``value``: the checks above as predicates, for code that collects
    every problem of a file before reporting them."""
    try:
        check("value", value)
    except (ValueError, TypeError):
        return False
    return True
