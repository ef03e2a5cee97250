"""pytest plugin (entry point ``pytest11: resilient``): SimulatedAPI fixtures.

``simulated_api``: a started :class:`~resilient.testing.SimulatedAPI` with the defaults,
closed after the test. ``simulated_api_factory``: ``await factory(**kwargs)`` starts one
with any ``SimulatedAPI`` arguments; all are closed after the test. Both are async
fixtures (they need pytest-asyncio, which is imported only if installed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._api import SimulatedAPI

    _async_fixture = pytest.fixture
else:
    try:  # strict-mode pytest-asyncio needs its own decorator; auto mode accepts either
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # pragma: no cover - without pytest-asyncio, async fixtures cannot run
        _async_fixture = pytest.fixture

__all__ = ["simulated_api", "simulated_api_factory"]

SimulatedAPIFactory = Callable[..., Awaitable["SimulatedAPI"]]


@_async_fixture
async def simulated_api() -> AsyncIterator[SimulatedAPI]:
    """A started ``SimulatedAPI()`` (defaults: 200 requests / 60 s per business)."""
    from ._api import SimulatedAPI

    async with SimulatedAPI() as api:
        yield api


@_async_fixture
async def simulated_api_factory() -> AsyncIterator[SimulatedAPIFactory]:
    """``api = await simulated_api_factory(quota=(5, 1.0), ...)``: started, closed at teardown.

    Call it inside the test when the configuration depends on time (``outages``,
    ``looptime``): the outage clock starts when the factory is awaited.
    """
    from ._api import SimulatedAPI

    started: list[SimulatedAPI] = []

    async def factory(**kwargs: Any) -> SimulatedAPI:
        api = SimulatedAPI(**kwargs)
        await api.start()
        started.append(api)
        return api

    try:
        yield factory
    finally:
        for api in reversed(started):
            await api.close()
