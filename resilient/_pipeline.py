"""The pipeline: resilient's policies as one aiohttp middleware.

aiohttp builds, for every request, one wrapper coroutine per middleware around the next
(``build_client_middlewares``), so a request's every I/O resume passes through a wrapper
frame and a policy frame per policy. :class:`Pipeline` is one middleware that hands each
policy the next one directly (a :func:`functools.partial`, which adds no frame), so a
chain of ``n`` policies costs ``n + 1`` frames instead of ``2n``. Each policy runs exactly
as it does alone; :func:`resilient.chain` returns a Pipeline of the policies, outermost
first, followed by the user's other middlewares.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator, Sequence
from functools import partial

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from ._policy import Policy

__all__ = ["Pipeline"]


class Pipeline:
    """One aiohttp middleware running ``policies`` (outermost first), see the module
    docstring. ``.policies`` lists them; iterating a Pipeline yields them too."""

    __slots__ = ("_inner", "_outer", "policies")

    def __init__(self, policies: Sequence[Policy]) -> None:
        if not policies:
            raise ValueError("Pipeline: policies must hold at least one policy, got none")
        self.policies: tuple[Policy, ...] = tuple(policies)
        self._outer = self.policies[0]
        self._inner = self.policies[:0:-1]  # innermost first, the outermost left out

    def __call__(
        self, request: ClientRequest, handler: ClientHandlerType
    ) -> Awaitable[ClientResponse]:
        for policy in self._inner:
            handler = partial(policy, handler=handler)
        return self._outer(request, handler)

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(p) for p in self.policies)})"
