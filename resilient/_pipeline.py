"""The pipeline: resilient's policies as one aiohttp middleware, one frame per call.

aiohttp builds, for every request, one wrapper coroutine per middleware around the next
(``build_client_middlewares``), so a request's every I/O resume passes through a wrapper
frame and a policy frame per policy. :class:`Pipeline` is one middleware that runs each
policy's synchronous fast path inline (:class:`~resilient._policy.Policy`: ``before``,
the attempt, ``after``) in one coroutine, so when no policy needs to wait the whole
chain costs one frame:

1. ``before`` of each policy, outermost first, until one refuses (raises: that
   exception is the outcome) or answers ``SLOW`` (that policy runs whole, as an
   ordinary middleware, around the pipeline of the policies inside it);
2. the attempt: aiohttp's handler (or the slow policy);
3. ``after`` of each policy that gave a ticket (not ``None``), innermost first, on the
   outcome; one that answers ``False`` takes the call over with ``resume`` (around the
   pipeline of the policies inside it), and its result is the outcome the outer ones
   see.

The call's clock and key: the pipeline reads the time once, as the call enters, hands it
to every ``before`` and marks the call with it (``_deadline.mark_start``) before any
policy runs whole or resumes, so every wait is bounded from the call's true start; a
call that waits for nothing never pays for the mark (a contextvar set, about 0.3 µs).
The key is computed once, by the key function the keyed policies share (``by_host``
unless told otherwise), and handed to every ``before``.
Each policy still works alone as an ordinary middleware; :func:`resilient.chain`
returns a Pipeline of the policies, outermost first, followed by the user's other
middlewares.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from . import _deadline
from ._keys import KeyFunc
from ._policy import SLOW, Outcome, Policy
from .observe import _metrics

__all__ = ["Pipeline"]


class Pipeline:
    """One aiohttp middleware running ``policies`` (outermost first), see the module
    docstring. ``.policies`` lists them; iterating a Pipeline yields them too."""

    __slots__ = ("_key", "policies")

    def __init__(self, policies: Sequence[Policy]) -> None:
        if not policies:
            raise ValueError("Pipeline: policies must hold at least one policy, got none")
        self.policies: tuple[Policy, ...] = tuple(policies)
        keys = {f for f in (p.keyed_by() for p in self.policies) if f is not None}
        self._key: KeyFunc | None = keys.pop() if len(keys) == 1 else None
        """The key function every keyed policy shares (None: none, or several)."""

    async def __call__(
        self, request: ClientRequest, handler: ClientHandlerType, start: int = 0
    ) -> ClientResponse:
        """The policies from ``start`` inward around ``handler`` (steps 1-3 above)."""
        now = request.loop.time()  # _clock.now_for, inlined (an inner run: already marked)
        policies = self.policies
        if _metrics.recorder is not None:  # telemetry: each policy counts its call whole
            _deadline.mark_start(request, now)
            return await policies[start](request, self._rest(handler, start + 1))
        key_of = self._key
        key = None if key_of is None else key_of(request)
        tickets: list[Any] = []
        outcome: Outcome
        i = start
        try:
            for policy in policies[start:] if start else policies:
                ticket = policy.before(request, key, now)
                if ticket is SLOW:
                    break
                tickets.append(ticket)
                i += 1
            if i == len(policies):
                outcome = await handler(request)
            else:
                _deadline.mark_start(request, now)
                outcome = await policies[i](request, self._rest(handler, i + 1))
        except BaseException as exc:
            outcome = exc
        while tickets:
            i -= 1
            policy = policies[i]
            ticket = tickets.pop()
            if ticket is not None and not policy.after(ticket, request, outcome):
                _deadline.mark_start(request, now)
                try:
                    outcome = await policy.resume(
                        ticket, request, self._rest(handler, i + 1), outcome
                    )
                except BaseException as exc:
                    outcome = exc
        if isinstance(outcome, BaseException):
            try:
                raise outcome
            finally:
                del outcome
        return outcome

    def _rest(self, handler: ClientHandlerType, start: int) -> ClientHandlerType:
        """``rest(request)``: the policies from ``start`` inward, then ``handler``."""
        if start == len(self.policies):
            return handler
        run: ClientHandlerType = partial(self, handler=handler, start=start)
        return run

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(p) for p in self.policies)})"
