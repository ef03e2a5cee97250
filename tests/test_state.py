"""KeyedState: per-key state in a bounded map; idle entries evicted, busy ones kept."""

from __future__ import annotations

import pytest

from resilient._state import KeyedState


class Entry:
    def __init__(self, key: str) -> None:
        self.key = key
        self.busy = False


def test_get_or_create_returns_the_same_entry_for_a_key():
    states = KeyedState(Entry, lambda e: not e.busy, max_keys=4)
    assert states.get_or_create("a") is states.get_or_create("a")
    assert states.get("b") is None


def test_idle_keys_are_evicted_so_the_map_stays_bounded():
    states = KeyedState(Entry, lambda e: not e.busy, max_keys=100)
    for i in range(100_000):
        states.get_or_create(f"k{i}")
        assert len(states) <= 100


def test_busy_keys_survive_eviction():
    states = KeyedState(Entry, lambda e: not e.busy, max_keys=8)
    busy = states.get_or_create("busy")
    busy.busy = True
    for i in range(1000):
        states.get_or_create(f"k{i}")
    assert states.get("busy") is busy


def test_oldest_idle_keys_go_first():
    states = KeyedState(Entry, lambda e: not e.busy, max_keys=8)
    for i in range(9):
        states.get_or_create(f"k{i}")
    assert "k0" not in states
    assert "k8" in states


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_max_keys_is_rejected(bad):
    with pytest.raises(ValueError, match="max_keys"):
        KeyedState(Entry, lambda e: True, max_keys=bad)
