"""PLACEHOLDER: being written (issue 3)."""
from __future__ import annotations
from typing import Any
from ._policy import Policy
class Throttle(Policy):
    kind = "throttle"
    order = 40
    def __init__(self, rate: float, **kwargs: Any) -> None: ...
