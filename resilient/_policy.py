"""What every policy is: an aiohttp client middleware with a place in the chain, and,
for the pipeline, a synchronous fast path around one attempt.

The fast path (Polly's shape: before the attempt, the attempt, the outcome):

- ``before(request, key, now)``: decide without waiting. ``key`` is the policy's own key
  of the request (:meth:`Policy.keyed_by` of it; the pipeline computes it once for every
  policy keyed by the same function), or ``None`` when the pipeline did not compute it
  (the policy then does); ``now`` is the call's clock reading as it entered the pipeline.
  Return a *ticket* (what the attempt holds: a probe slot, a concurrency slot, a start
  time; ``None`` when nothing is held and nothing is to be done after the attempt: the
  pipeline then does not call ``after``), raise to refuse the call (the exception is
  the outcome the outer policies see), or return :data:`SLOW` when deciding needs a
  wait: the pipeline then runs the policy as an ordinary middleware, ``await
  policy(request, rest)``, for this call.
- ``after(ticket, request, outcome)``: record the outcome (a ``ClientResponse`` or the
  exception the attempt raised) and hand back what the ticket holds. Return ``True``
  when the outcome stands, ``False`` to take the call over: the pipeline then awaits
  ``resume(ticket, request, rest, outcome)``, which owns the ticket and continues as
  ``__call__`` would after that first attempt (wait, send again through ``rest``, or
  raise). ``after`` never returns ``False`` for a cancellation (a ``BaseException``
  that is not an ``Exception``): it releases and lets it pass.

``rest`` is the policies inside this one followed by aiohttp's handler (one callable,
``rest(request)``). The defaults say "always slow", so a policy without a fast path is
simply awaited whole. While a metrics backend is installed the pipeline runs every
policy whole (each counts its own call in ``__call__``): the fast path never sees
telemetry.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, final

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from ._keys import KeyFunc

__all__ = ["SLOW", "Outcome", "Policy"]

Outcome = ClientResponse | BaseException
"""What one attempt ended with: the response, or the exception it raised."""


@final
class _Slow:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SLOW"


SLOW: Final[Any] = _Slow()
"""``before``'s answer when the policy must wait to decide: run it whole for this call."""


class Policy:
    """Base of every ``resilient`` middleware.

    ``order`` ranks a policy in :func:`resilient.chain` (smaller is outer):
    auth 0, hedge 5, retry 10, circuit breaker 20, 429 backoff 30, concurrency limit 35,
    throttle 40, chaos 50.
    ``kind`` names the slot: a chain holds at most one policy of each kind.
    """

    __slots__ = ()

    kind: ClassVar[str] = "policy"
    order: ClassVar[int] = 100

    async def __call__(
        self, request: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:  # pragma: no cover - overridden
        raise NotImplementedError

    def keyed_by(self) -> KeyFunc | None:
        """The key function of the policy's per-key state (None: it keeps none)."""
        return None

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """The ticket of this attempt, or :data:`SLOW` (see the module docstring)."""
        return SLOW

    def after(self, ticket: Any, request: ClientRequest, outcome: Outcome) -> bool:
        """Record ``outcome``, hand back what ``ticket`` holds; ``False``: resume."""
        return True

    async def resume(
        self, ticket: Any, request: ClientRequest, rest: ClientHandlerType, outcome: Outcome
    ) -> ClientResponse:  # pragma: no cover - only called after after() said False
        """Go on after a first attempt whose outcome ``after`` would not let stand."""
        raise NotImplementedError
