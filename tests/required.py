"""The rule for a test's missing server binary, in one place: skip, but fail under CI.

CI never passes by skipping the tests that need a real ``redis-server`` or ``nginx``.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["missing"]


def missing(message: str) -> NoReturn:
    """Skip the test for ``message``; under ``CI=true`` fail it instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; CI=true forbids skipping this test")
    pytest.skip(message)
