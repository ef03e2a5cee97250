"""Backoff strategies: how long to wait before retry ``n`` (``n = 1`` is the first retry).

A strategy is an immutable value. :meth:`per_call` returns the ``(attempt) -> seconds``
function one call uses, so a stateful strategy (decorrelated jitter) keeps its state per
call, never in the shared configuration. ``Retry`` asks for it only when a retry is due.

A tenacity wait strategy (``tenacity.wait_exponential(...)`` or any
``tenacity.wait.wait_base``) and a plain ``(attempt) -> seconds`` callable are accepted
too; see :func:`per_call_factory`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

import tenacity

from .._validate import number, reject

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_CAP",
    "Backoff",
    "BackoffLike",
    "DecorrelatedJitter",
    "FullJitter",
    "PerCallBackoff",
    "per_call_factory",
]

DEFAULT_BASE = 0.5
"""Seconds: the scale of the first retry's wait."""
DEFAULT_CAP = 30.0
"""Seconds: no backoff wait is longer than this."""

Backoff: TypeAlias = Callable[[int], float]
"""``(attempt) -> seconds`` for one call; ``attempt`` is 1 for the first retry."""


@runtime_checkable
class PerCallBackoff(Protocol):
    """A strategy that hands out a fresh ``(attempt) -> seconds`` function per call."""

    def per_call(self) -> Backoff: ...


BackoffLike: TypeAlias = "PerCallBackoff | tenacity.wait.wait_base | Backoff"
"""What ``Retry(backoff=...)`` accepts."""


def _check(owner: str, base: float, cap: float) -> tuple[float, float]:
    """``(base, cap)`` as floats: base finite > 0, cap finite >= base."""
    base = number(owner, "base", base, 0.0, math.inf, low_open=True, high_open=True)
    cap = number(owner, "cap", cap, 0.0, math.inf, low_open=True, high_open=True)
    if cap < base:
        raise reject(owner, "cap", f"a finite number >= base ({base!r})", cap)
    return base, cap


def capped_doubling(base: float, cap: float, exponent: int) -> float:
    """``min(cap, base·2^exponent)`` for ``exponent >= 0`` (negative counts as 0);
    no overflow for any exponent."""
    return min(cap, base * 2.0 ** min(max(exponent, 0), 1023))


@dataclass(frozen=True, slots=True)
class FullJitter:
    """Capped exponential backoff with full jitter (AWS architecture blog).

    delay(n) = uniform(0, min(cap, base · 2^(n−1)));  huge ``n`` gives uniform(0, cap).
    Stateless: :meth:`per_call` returns the strategy itself.
    """

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        base, cap = _check("FullJitter", self.base, self.cap)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "cap", cap)

    def __call__(self, attempt: int) -> float:
        return random.uniform(0.0, capped_doubling(self.base, self.cap, attempt - 1))

    def per_call(self) -> Backoff:
        return self


@dataclass(frozen=True, slots=True)
class DecorrelatedJitter:
    """Decorrelated jitter (AWS architecture blog): each wait grows from the previous one.

    delay = min(cap, uniform(base, 3 · previous)), with previous = base before the first
    retry. The ``previous`` state lives in the function :meth:`per_call` returns.
    """

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        base, cap = _check("DecorrelatedJitter", self.base, self.cap)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "cap", cap)

    def step(self, previous: float) -> float:
        """One wait from the previous one: min(cap, uniform(base, 3 · previous))."""
        # 3 · previous may overflow to inf for an absurd cap; min() then yields cap.
        return min(self.cap, random.uniform(self.base, 3.0 * previous))

    def per_call(self) -> Backoff:
        previous = self.base

        def delay(attempt: int) -> float:
            nonlocal previous
            previous = self.step(previous)
            return previous

        return delay


def _tenacity_factory(wait: tenacity.wait.wait_base) -> Callable[[], Backoff]:
    """Adapt a tenacity wait: one ``RetryCallState`` per call, built on the first retry.

    ``attempt_number`` = n (the n-th attempt just failed), as tenacity sets it before
    asking its wait; ``idle_for`` accumulates. Waits that read ``retry_state.outcome``
    (``wait_exception``) are not supported.
    """
    retrying = tenacity.AsyncRetrying(wait=wait)

    def start() -> Backoff:
        state = tenacity.RetryCallState(retrying, None, (), {})

        def delay(attempt: int) -> float:
            state.attempt_number = attempt
            seconds = float(wait(state))
            state.idle_for += seconds
            return seconds

        return delay

    return start


def per_call_factory(backoff: BackoffLike) -> Callable[[], Backoff]:
    """Resolve ``backoff`` once (at construction) to a zero-argument per-call factory.

    Strategies with ``per_call()`` use it; a tenacity ``wait_base`` is adapted; any other
    callable is taken as a stateless ``(attempt) -> seconds`` function.
    """
    if isinstance(backoff, tenacity.wait.wait_base):
        return _tenacity_factory(backoff)
    if isinstance(backoff, PerCallBackoff):
        return backoff.per_call
    if callable(backoff):
        fn = backoff
        return lambda: fn
    raise reject(
        "Retry",
        "backoff",
        "FullJitter, DecorrelatedJitter, a tenacity wait strategy or an (attempt) -> seconds"
        " callable",
        backoff,
    )
