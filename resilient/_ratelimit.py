"""PLACEHOLDER: being written (issue 3)."""
from __future__ import annotations
from typing import Any
from ._policy import Policy
class RateLimitBackoff(Policy):
    kind = "rate_limit_backoff"
    order = 30
    def __init__(self, **kwargs: Any) -> None: ...
