"""PLACEHOLDER: being written (issue 2)."""
from __future__ import annotations
from typing import Any
from ._policy import Policy
class CircuitBreaker(Policy):
    kind = "circuit_breaker"
    order = 20
    def __init__(self, **kwargs: Any) -> None: ...
