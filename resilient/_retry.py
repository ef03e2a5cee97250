"""PLACEHOLDER: being written (issue 2)."""
from __future__ import annotations
from typing import Any
from ._policy import Policy
class FullJitter:
    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None: ...
class DecorrelatedJitter:
    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None: ...
class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0) -> None: ...
class Retry(Policy):
    kind = "retry"
    order = 10
    def __init__(self, **kwargs: Any) -> None: ...
