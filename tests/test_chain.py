"""chain() orders policies and rejects duplicates; session() lets long waits happen."""

from __future__ import annotations

import aiohttp
import pytest

import resilient
from resilient._chain import DEFAULT_TIMEOUT


def test_chain_puts_policies_in_the_recommended_order():
    throttle = resilient.Throttle(5.0)
    backoff = resilient.RateLimitBackoff()
    breaker = resilient.CircuitBreaker()
    retry = resilient.Retry()
    (pipeline,) = resilient.chain(throttle, breaker, backoff, retry)
    assert pipeline.policies == (retry, breaker, backoff, throttle)  # type: ignore[attr-defined]


def test_chain_opens_up_an_earlier_chain():
    retry, throttle = resilient.Retry(), resilient.Throttle(5.0)
    (pipeline,) = resilient.chain(*resilient.chain(throttle), retry)
    assert pipeline.policies == (retry, throttle)  # type: ignore[attr-defined]


def test_chain_rejects_two_policies_of_one_kind():
    with pytest.raises(ValueError, match="two retry policies"):
        resilient.chain(resilient.Retry(), resilient.Throttle(1.0), resilient.Retry())


def test_chain_keeps_foreign_middlewares_innermost_in_given_order():
    async def first(request, handler):
        return await handler(request)

    async def second(request, handler):
        return await handler(request)

    retry = resilient.Retry()
    pipeline, *others = resilient.chain(first, retry, second)
    assert pipeline.policies == (retry,)  # type: ignore[attr-defined]
    assert others == [first, second]


def test_chain_rejects_a_non_callable():
    with pytest.raises(TypeError, match="not a middleware"):
        resilient.chain(42)  # type: ignore[arg-type]


def test_empty_chain_is_empty():
    assert resilient.chain() == ()


async def test_session_has_no_total_timeout_but_finite_connect_and_read():
    async with resilient.session(resilient.Retry()) as s:
        assert s.timeout.total is None
        assert s.timeout.sock_read is not None
        assert s.timeout.sock_read > 0
        assert s.timeout.connect is not None
        assert s.timeout.connect > 0
        assert s.timeout == DEFAULT_TIMEOUT


async def test_session_keeps_a_timeout_given_by_the_caller():
    timeout = aiohttp.ClientTimeout(total=30)
    async with resilient.session(timeout=timeout) as s:
        assert s.timeout is timeout


async def test_session_passes_other_client_session_arguments_through(server):
    async with resilient.session(headers={"X-Business": "b1"}, base_url=server.url) as s:
        async with s.get("/hello") as r:
            assert r.status == 200
    assert server.arrivals[0].headers["X-Business"] == "b1"
    assert server.arrivals[0].path == "/hello"


async def test_session_rejects_middlewares_keyword():
    with pytest.raises(ValueError, match="positionally"):
        resilient.session(middlewares=(resilient.Retry(),))


async def test_session_runs_the_chain_outermost_first(server):
    order: list[str] = []

    def tracer(name: str):
        async def middleware(request, handler):
            order.append(name)
            return await handler(request)

        return middleware

    async with resilient.session(tracer("a"), tracer("b")) as s, s.get(server.url):
        pass
    assert order == ["a", "b"]


# --- the pipeline ------------------------------------------------------------------


async def test_the_pipeline_runs_the_policies_with_one_aiohttp_wrapper(server):
    """aiohttp wraps each middleware in a coroutine per request; the pipeline is one
    middleware, so however many policies it holds, one wrapper frame stands above them."""
    import inspect

    wrappers: list[int] = []

    async def innermost(request, handler):
        frames = [f.function for f in inspect.stack()]
        wrappers.append(frames.count("wrapped"))
        return await handler(request)

    server.script("/x", 503, 200)
    policies = (
        resilient.Retry(backoff=resilient.FullJitter(0.001, 0.001)),
        resilient.CircuitBreaker(),
        resilient.RateLimitBackoff(),
        resilient.Throttle(1e6, burst=100),
    )
    async with resilient.session(*policies, innermost) as session:
        async with session.get(server.url + "/x") as resp:
            assert resp.status == 200  # the 503 was retried through the pipeline
    assert wrappers == [2, 2]  # the pipeline's and the innermost middleware's own


def test_a_pipeline_needs_a_policy_and_shows_them():
    from resilient._pipeline import Pipeline

    with pytest.raises(ValueError, match="policies"):
        Pipeline(())
    retry = resilient.Retry()
    assert repr(Pipeline((retry,))) == f"Pipeline({retry!r})"
    assert list(Pipeline((retry,))) == [retry]
