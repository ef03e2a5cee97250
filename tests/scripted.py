"""Small replies and waits the pipeline tests share (with the ``server`` fixture of
``conftest.py``, whose ``script(path, *replies)`` takes these replies)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from aiohttp import web

import resilient
from resilient import Event
from resilient._policy import SLOW

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(status: int = 200, **headers: str) -> Reply:
    """A reply that answers ``status`` at once, with ``headers``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=f"status {status}", headers=headers)

    return answer


def held(gate: asyncio.Event, status: int = 200) -> Reply:
    """A reply that waits for ``gate`` (the ``gate`` fixture) before answering ``status``."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=status, text="held")

    return reply


def delayed(seconds: float, status: int = 200, text: str | None = None) -> Reply:
    """A reply that answers ``status`` after ``seconds`` (loop time)."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=status, text=f"after {seconds}" if text is None else text)

    return reply


async def drop_connection(request: web.Request) -> web.StreamResponse:
    """Read the request, then close the connection without answering
    (aiohttp: ``ServerDisconnectedError``)."""
    await request.read()
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError


async def until(condition: Callable[[], bool], steps: int = 10_000) -> None:
    """Let the loop run in 1 ms steps until ``condition()`` holds (at most ``steps``)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def poll(
    loop: asyncio.AbstractEventLoop,
    settle: Callable[[float], Awaitable[None]],
    check: Callable[[], Any],
    limit: float,
) -> Any:
    """``check()`` (awaited when it returns an awaitable) once it is truthy, or its last
    value after ``limit`` seconds of loop time, letting the loop ``settle(0.01)`` between
    reads: what holds at rest in a model test."""
    end = loop.time() + limit
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value or loop.time() >= end:
            return value
        await settle(0.01)


def facts(events: list[Event]) -> list[tuple[object, ...]]:
    """What an event says (``delay`` to the millisecond, without the wall-clock ``until``)."""
    return [
        (e.kind, e.key, e.policy, e.method, e.url, e.attempt, e.status, e.reason, ms(e.delay))
        for e in events
    ]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


Counted = list[tuple[object, object, object]]


@contextlib.contextmanager
def telemetry() -> Iterator[Callable[[], Counted]]:
    """OpenTelemetry instrumented (an SDK MeterProvider with an in-memory reader) for the
    block; yields ``counted()``: the ``resilient.requests`` points as ``(policy, status,
    count)``, readable after the block."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    uninstrument = resilient.instrument_opentelemetry(provider)

    def counted() -> Counted:
        data = reader.get_metrics_data()
        assert data is not None
        return [
            (point.attributes.get("policy"), point.attributes.get("status"), point.value)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "resilient.requests"
            for point in metric.data.data_points
        ]

    try:
        yield counted
    finally:
        uninstrument()
        provider.shutdown()


class Watched:
    """Mixed in before a policy (``class Watched(scripted.Watched, Throttle)``): counts
    how the pipeline ran it: ``whole`` (``__call__``), ``tickets`` (``before`` gave one),
    ``refused`` (``before`` raised), ``resumed`` (a first outcome handed to ``resume``)."""

    whole = tickets = refused = resumed = 0

    async def __call__(self, request: Any, handler: Any) -> Any:
        self.whole += 1
        return await super().__call__(request, handler)  # type: ignore[misc]

    def before(self, request: Any, key: str | None, now: float) -> Any:
        try:
            ticket = super().before(request, key, now)  # type: ignore[misc]
        except Exception:
            self.refused += 1
            raise
        if ticket is not SLOW:
            self.tickets += 1
        return ticket

    async def resume(self, ticket: Any, request: Any, rest: Any, outcome: Any) -> Any:
        self.resumed += 1
        return await super().resume(ticket, request, rest, outcome)  # type: ignore[misc]


async def status_of(client: aiohttp.ClientSession, url: str, middlewares: Any) -> int | str:
    """The status of one GET, or the name of the exception it raised."""
    try:
        async with client.get(url, middlewares=middlewares) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__
