"""Logging on the ``resilient`` logger: waits of a second or more at INFO.

Lines name the reason, the key, the duration in human units and the UTC end time
in ISO 8601. They never contain request headers or query strings.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

from .. import _clock

__all__ = ["LOG_WAIT_THRESHOLD", "human_duration", "log_wait", "logger"]

logger = logging.getLogger("resilient")

LOG_WAIT_THRESHOLD = 1.0
"""Waits at least this long (seconds) are logged at INFO; shorter ones at DEBUG."""


def human_duration(seconds: float) -> str:
    """``3725.0 -> '1h 2m 5s'``; sub-second values keep milliseconds. Never raises: a
    negative delay reads ``0ms``, ``inf`` ``forever``, ``nan`` ``an unknown time``."""
    if not seconds < math.inf:  # inf or nan: int() cannot take them
        return "forever" if seconds == math.inf else "an unknown time"
    if seconds < 1.0:
        if seconds <= 0.0:
            return "0ms"
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60.0:
        return f"{seconds:.1f}s"
    total = int(seconds)
    days, rem = divmod(total, 86_400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    parts += [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


def log_wait(
    policy: str, reason: str, key: str, delay: float, until: datetime | None = None
) -> None:
    """Log a wait of ``delay`` seconds ending at ``until`` (UTC; default now + ``delay``):
    INFO from one second up, DEBUG below. Any float formats (see :func:`human_duration`,
    :func:`~resilient._clock.wall_after`): a log line never turns a response into a crash."""
    level = logging.INFO if delay >= LOG_WAIT_THRESHOLD else logging.DEBUG
    if logger.isEnabledFor(level):
        end = _clock.wall_after(delay) if until is None else until
        logger.log(
            level,
            "%s: %s on %s; waiting %s until %s",
            policy,
            reason,
            key,
            human_duration(delay),
            end.isoformat(timespec="seconds"),
        )
