"""One set of argument checks: every invalid argument is a ValueError naming it.

The message reads ``"<Owner>: <name> must be <what>, got <value!r>"``. Numbers are
real ints or floats, never bools; NaN fails every range. Each check returns the value
in its canonical type (``float`` for numbers), so a constructor reads
``self._rate = number("Throttle", "rate", rate, 0.0, MAX_RATE)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TypeGuard, TypeVar

__all__ = ["choice", "integer", "is_real", "number", "optional_number", "reject"]

T = TypeVar("T")


def reject(owner: str, name: str, what: str, value: object) -> ValueError:
    """The ValueError for ``name`` (raise it): ``"<owner>: <name> must be <what>, got …"``."""
    return ValueError(f"{owner}: {name} must be {what}, got {value!r}")


def is_real(value: object) -> TypeGuard[float]:
    """An int or a float, not a bool (NaN passes here and fails every range check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:  # high_open: finite
        kind = "a finite number" if high_open else "a number"
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if low == -math.inf:  # low_open: finite
        kind = "a finite number" if low_open else "a number"
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return f"a number in {left}{low:g}, {high:g}{right}"


def number(
    owner: str,
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float in the range (``low_open``/``high_open`` exclude the ends)."""
    if is_real(value):
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if above and below:
            return float(value)
    raise reject(owner, name, _range(low, high, low_open, high_open), value)


def optional_number(
    owner: str,
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    none_means: str = "",
) -> float | None:
    """``None``, or :func:`number`; ``none_means`` explains ``None`` in the message."""
    if value is None:
        return None
    try:
        return number(owner, name, value, low, high, low_open=low_open, high_open=high_open)
    except ValueError:
        what = _range(low, high, low_open, high_open)
        none = f"None ({none_means})" if none_means else "None"
        raise reject(owner, name, f"{none} or {what}", value) from None


def integer(owner: str, name: str, value: object, low: int = 1, high: float = math.inf) -> int:
    """``value`` as an int in ``[low, high]`` (bools refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    what = f"an int >= {low}" if high == math.inf else f"an int in [{low}, {int(high)}]"
    raise reject(owner, name, what, value)


def choice(owner: str, name: str, value: object, options: Collection[T]) -> T:
    """The option equal to ``value``."""
    for option in options:
        if value == option:
            return option
    raise reject(owner, name, "one of " + ", ".join(repr(o) for o in options), value)
