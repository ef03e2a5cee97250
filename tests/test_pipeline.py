"""The pipeline's fast-path protocol (``resilient/_pipeline.py``), with small recording
policies around a real loopback server: the order of ``before``/``after``, SLOW, a
refusal raised by ``before``, ``resume`` taking a call over, exceptions and
cancellation reaching every ``after``, and one coroutine frame when nothing waits."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from scripted import telemetry

from resilient._pipeline import Pipeline
from resilient._policy import SLOW, Outcome, Policy

pytestmark = pytest.mark.timeout(10)


class Recorder(Policy):
    """Logs every protocol call into ``log`` as ``(name, step, detail)``.

    ``slow``: ``before`` answers SLOW; ``refuse``: ``before`` raises it; ``resume_on``: a
    status whose outcome ``after`` hands to ``resume``, which re-sends once."""

    __slots__ = ("log", "name", "refuse", "resume_on", "slow")

    def __init__(
        self,
        name: str,
        log: list[tuple[str, str, Any]],
        *,
        slow: bool = False,
        refuse: Exception | None = None,
        resume_on: int | None = None,
    ) -> None:
        self.name, self.log, self.slow, self.refuse = name, log, slow, refuse
        self.resume_on = resume_on

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        self.log.append((self.name, "call", None))
        try:
            resp = await handler(request)
        except BaseException as exc:
            self.log.append((self.name, "call-out", type(exc).__name__))
            raise
        self.log.append((self.name, "call-out", resp.status))
        return resp

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        self.log.append((self.name, "before", None))
        if self.refuse is not None:
            raise self.refuse
        return SLOW if self.slow else f"ticket-{self.name}"

    def after(self, ticket: Any, request: ClientRequest, outcome: Outcome) -> bool:
        detail = outcome.status if isinstance(outcome, ClientResponse) else type(outcome).__name__
        self.log.append((self.name, "after", (ticket, detail)))
        return not (isinstance(outcome, ClientResponse) and outcome.status == self.resume_on)

    async def resume(
        self, ticket: Any, request: ClientRequest, rest: ClientHandlerType, outcome: Outcome
    ) -> ClientResponse:
        assert isinstance(outcome, ClientResponse)
        outcome.release()
        self.log.append((self.name, "resume", ticket))
        return await rest(request)


async def test_befores_run_outermost_first_and_afters_innermost_first(server, client):
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    async with client.get(server.url + "/x", middlewares=(pipe,)) as resp:
        assert resp.status == 200
    assert log == [
        ("a", "before", None),
        ("b", "before", None),
        ("c", "before", None),
        ("c", "after", ("ticket-c", 200)),
        ("b", "after", ("ticket-b", 200)),
        ("a", "after", ("ticket-a", 200)),
    ]
    assert server.count("/x") == 1


async def test_slow_runs_that_policy_whole_around_the_fast_path_of_the_inner_ones(server, client):
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log, slow=True), Recorder("c", log)])
    async with client.get(server.url + "/x", middlewares=(pipe,)) as resp:
        assert resp.status == 200
    assert log == [
        ("a", "before", None),
        ("b", "before", None),
        ("b", "call", None),
        ("c", "before", None),
        ("c", "after", ("ticket-c", 200)),
        ("b", "call-out", 200),
        ("a", "after", ("ticket-a", 200)),
    ]


async def test_with_telemetry_installed_every_policy_runs_whole(server, client):
    """A metrics backend counts each policy's call in its ``__call__``: the pipeline then
    asks no ``before`` and runs every policy whole, outermost first."""
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log)])
    with telemetry():
        async with client.get(server.url + "/x", middlewares=(pipe,)) as resp:
            assert resp.status == 200
    assert log == [
        ("a", "call", None),
        ("b", "call", None),
        ("b", "call-out", 200),
        ("a", "call-out", 200),
    ]
    async with client.get(server.url + "/x", middlewares=(pipe,)) as resp:  # uninstalled
        assert resp.status == 200
    assert [step for _, step, _ in log[4:]] == ["before", "before", "after", "after"]


async def test_a_refusal_in_before_is_the_outcome_the_outer_policies_see(server, client):
    log: list[tuple[str, str, Any]] = []
    refusal = aiohttp.ClientConnectionError("refused by b")
    pipe = Pipeline([Recorder("a", log), Recorder("b", log, refuse=refusal), Recorder("c", log)])
    with pytest.raises(aiohttp.ClientConnectionError, match="refused by b"):
        await client.get(server.url + "/x", middlewares=(pipe,))
    assert log == [
        ("a", "before", None),
        ("b", "before", None),
        ("a", "after", ("ticket-a", "ClientConnectionError")),
    ]
    assert server.count() == 0  # nothing was sent


async def test_after_saying_false_hands_the_call_to_resume_around_the_inner_policies(
    server, client
):
    server.script("/x", 503)
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log, resume_on=503), Recorder("c", log)])
    async with client.get(server.url + "/x", middlewares=(pipe,)) as resp:
        assert resp.status == 200  # resume sent again, the 503 released
    assert log == [
        ("a", "before", None),
        ("b", "before", None),
        ("c", "before", None),
        ("c", "after", ("ticket-c", 503)),
        ("b", "after", ("ticket-b", 503)),
        ("b", "resume", "ticket-b"),
        ("c", "before", None),  # the re-send goes through the inner policies' fast path
        ("c", "after", ("ticket-c", 200)),
        ("a", "after", ("ticket-a", 200)),  # the outer ones see resume's result only
    ]
    assert server.count("/x") == 2


async def test_an_exception_of_the_attempt_reaches_every_after_and_the_caller(client):
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log)])
    with pytest.raises(aiohttp.ClientConnectorError):  # nothing listens on port 9
        await client.get("http://127.0.0.1:9/x", middlewares=(pipe,))
    assert [(n, s) for n, s, _ in log] == [
        ("a", "before"),
        ("b", "before"),
        ("b", "after"),
        ("a", "after"),
    ]
    assert log[2][2] == ("ticket-b", "ClientConnectorError")


async def test_a_cancelled_call_reaches_every_after_with_the_cancellation(server, client):
    arrived, done = asyncio.Event(), asyncio.Event()

    async def hang(_: Any) -> Any:
        arrived.set()
        await done.wait()  # set at the end, so the server shuts down at once
        return web.Response(text="late")

    server.script("/hang", hang)
    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log, resume_on=200)])
    call = asyncio.ensure_future(client.get(server.url + "/hang", middlewares=(pipe,)))
    await asyncio.wait_for(arrived.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    done.set()
    assert log[-2:] == [
        ("b", "after", ("ticket-b", "CancelledError")),
        ("a", "after", ("ticket-a", "CancelledError")),
    ]


async def test_nothing_waits_so_the_whole_chain_is_one_coroutine_frame(server, client):
    """On the fast path an I/O resume of the attempt passes through the pipeline's one
    frame: the aiohttp handler's caller is Pipeline.__call__, whose caller is aiohttp's
    wrapper (no policy frames between)."""
    callers: list[str] = []

    async def innermost(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "single_middleware_handler":
            callers.append(frame.f_code.co_qualname)
            frame = frame.f_back  # type: ignore[assignment]
        return await handler(request)

    log: list[tuple[str, str, Any]] = []
    pipe = Pipeline([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    async with client.get(server.url + "/x", middlewares=(pipe, innermost)) as resp:
        assert resp.status == 200
    # innermost is wrapped by aiohttp (one wrapper per middleware); between it and the
    # pipeline's wrapper there is the pipeline's own frames only
    assert [c for c in callers if "Recorder" in c] == []
    assert [c for c in callers if c.startswith("Pipeline.")] == ["Pipeline.__call__"]


def test_slow_is_one_named_sentinel():
    assert repr(SLOW) == "SLOW"
    assert Policy().before(None, None, 0.0) is SLOW  # type: ignore[arg-type]
