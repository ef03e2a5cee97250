"""Where a Throttle's quota windows live: one small interface, a store per backend.

:class:`QuotaStore` is all :class:`~resilient.Throttle` knows of its quotas. A request
*boards* (takes a place in every window, counted *in flight* under a ticket) before it
is sent and *lands* (takes its slot, timestamped when its attempt ended) after:

- ``board(key, in_flight, now)``: synchronous. ``(0.0, ticket)``: boarded under
  ``ticket``; ``(seconds, name)``: a window is full for that long (its name, e.g.
  ``"quota 200 per 1 minute"``), nothing counted; ``None``: the store cannot tell
  without asking its backend, and
- ``await ask(key, in_flight)`` does so (the same answers, or ``StorageError`` when the
  backend fails; whatever it may have boarded is handed back);
- ``land(key, now, ticket)``: the attempt boarded under ``ticket`` ended at ``now``
  (response, failure or cancellation: it may have reached the server). It never waits:
  a remote store sends it in the background.
- ``warn(exc)``: log that the backend failed and this process's own windows decide.

``in_flight`` counts the key's other requests in flight in this process (a remote
store counts every process's in its backend). A window has room for one more request
while ``used + in_flight < amount`` (:mod:`resilient.throttle._quota`). The two peers:
:class:`~resilient.throttle._quota.Quotas` (this process's memory; ``board`` always
answers, synchronously, and every ticket is ``""``) and
:class:`~resilient.throttle._redis.RedisQuotas` (shared through Redis; ``board`` answers
from slots this process leased, else ``None``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._errors import StorageError

__all__ = ["Boarding", "QuotaStore"]

Boarding = tuple[float, str]
"""``(0.0, ticket)``: boarded; ``(seconds, window name)``: full for that long."""


class QuotaStore(Protocol):
    """A Throttle's quota windows behind one interface (see the module docstring)."""

    @property
    def text(self) -> str:
        """The quotas as given (``"200/minute;5000/day"``)."""

    def board(self, key: str, in_flight: int, now: float) -> Boarding | None:
        """Board now if the store can tell at once, else None (:meth:`ask`)."""

    async def ask(self, key: str, in_flight: int) -> Boarding:
        """Board through the backend (``StorageError``: it failed; nothing is held)."""

    def land(self, key: str, now: float, ticket: str) -> None:
        """The attempt boarded under ``ticket`` ended at ``now``: its slot is taken."""

    def warn(self, exc: StorageError) -> None:
        """Log that the backend failed and this process's own windows decide."""
