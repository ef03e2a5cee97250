"""A bounded per-key state map.

Per-key state (buckets, pauses, breaker windows) lives in a dict capped at
``max_keys`` *idle* entries: when an insert finds the map full, idle entries are
evicted oldest-inserted first until it is back to 7/8 of ``max_keys``. An entry
is idle when ``is_idle(entry)`` says so (no waiters, nothing it must remember);
busy entries are never evicted, so the map holds at most
``max_keys + (keys with waiters or open state)`` entries. Eviction is amortised
O(1) per insert; a lookup is one dict access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["DEFAULT_MAX_KEYS", "KeyedState"]

DEFAULT_MAX_KEYS = 10_000

S = TypeVar("S")


class KeyedState(Generic[S]):
    """``key -> state`` with idle-key eviction. ``get_or_create`` is the only write."""

    __slots__ = ("_factory", "_is_idle", "_low_water", "_max_keys", "_states", "get")

    def __init__(
        self,
        factory: Callable[[str], S],
        is_idle: Callable[[S], bool],
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {max_keys!r}")
        self._states: dict[str, S] = {}
        self.get: Callable[[str], S | None] = self._states.get
        """``state`` or None: the dict's own ``get`` (a hot-path lookup, no wrapper)."""
        self._factory = factory
        self._is_idle = is_idle
        self._max_keys = max_keys
        self._low_water = max_keys - max_keys // 8

    def get_or_create(self, key: str) -> S:
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= self._max_keys:
                self._evict()
            state = self._states[key] = self._factory(key)
        return state

    def _evict(self) -> None:
        states, is_idle = self._states, self._is_idle
        excess = len(states) - self._low_water
        idle = [k for k, s in states.items() if is_idle(s)][:excess]
        for key in idle:
            del states[key]

    def discard(self, key: str) -> None:
        self._states.pop(key, None)

    def items(self) -> Iterator[tuple[str, S]]:
        return iter(list(self._states.items()))

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states
