"""OpenTelemetry spans and metrics, read back with the SDK's in-memory exporter and reader
(no global provider), against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

import resilient
from resilient.observe import _metrics
from resilient.observe._otel import url_full

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

pytestmark = pytest.mark.timeout(30)


def retry_after(status: int, seconds: int) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": str(seconds)})

    return reply


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class Metrics:
    """One MeterProvider with an in-memory reader and one TracerProvider with an
    in-memory exporter, instrumented for the test."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.tracer_provider.get_tracer("test")

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def value(self, name: str, **attributes: object) -> float:
        """The sum of ``name``'s points whose attributes include ``attributes``."""
        return sum(
            p.value
            for p in self.points(name)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )

    def spans(self) -> list[ReadableSpan]:
        """Finished spans, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def attempts(self) -> list[ReadableSpan]:
        """resilient's spans (one per request on the wire), in the order they started."""
        ours = [s for s in self.spans() if s.instrumentation_scope.name == "resilient"]
        return sorted(ours, key=lambda s: s.start_time or 0)

    def shutdown(self) -> None:
        self.provider.shutdown()
        self.tracer_provider.shutdown()


def includes(attributes: Any, **expected: object) -> bool:
    """``attributes`` hold every item of ``expected`` (dotted names: ``**{"a.b": 1}``)."""
    return all(attributes.get(k) == v for k, v in expected.items())


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    uninstrument = resilient.instrument_opentelemetry(m.provider, m.tracer_provider)
    yield m
    uninstrument()
    m.shutdown()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=resilient.DEFAULT_TIMEOUT) as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str, *policies: object, **kw: Any) -> int:
    async with session.get(url, middlewares=resilient.chain(*policies), **kw) as resp:
        await resp.read()
        return resp.status


def quick_retry(**kwargs: object) -> resilient.Retry:
    return resilient.Retry(backoff=lambda attempt: 0.0, budget=None, **kwargs)


# --- counters -----------------------------------------------------------------------


async def test_a_call_is_counted_once_by_the_outermost_policy(server, session, metrics):
    policies = (quick_retry(), resilient.CircuitBreaker(), resilient.Throttle(1e3, burst=10))
    await fetch(session, server.url + "/r", *policies)
    await fetch(session, server.url + "/r", *policies)
    assert metrics.value("resilient.requests", key=server.url, policy="retry", status=200) == 2
    assert metrics.value("resilient.requests") == 2


async def test_a_retried_call_is_counted_once_with_its_final_status(server, session, metrics):
    server.script("/r", 503)
    await fetch(session, server.url + "/r", quick_retry(), resilient.Throttle(1e3, burst=10))
    assert metrics.value("resilient.requests", policy="retry", status=200) == 1
    assert metrics.value("resilient.requests") == 1
    assert metrics.value("resilient.retries") == 1


async def test_a_call_through_one_policy_is_counted_by_it(server, session, metrics):
    await fetch(session, server.url + "/r", resilient.Throttle(1e3, burst=10))
    assert metrics.value("resilient.requests", key=server.url, policy="throttle", status=200) == 1


async def test_a_request_that_raises_is_counted_with_the_exception_name(server, session, metrics):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    with pytest.raises(resilient.CircuitOpenError):
        await fetch(session, server.url + "/r", breaker)
    assert metrics.value("resilient.requests", policy="circuit_breaker", status=500) == 1
    assert metrics.value("resilient.requests", status="CircuitOpenError") == 1


async def test_retries_are_counted_with_the_status_that_caused_them(server, session, metrics):
    server.script("/r", 503, 502)
    assert await fetch(session, server.url + "/r", quick_retry()) == 200
    assert metrics.value("resilient.retries", key=server.url, policy="retry", status=503) == 1
    assert metrics.value("resilient.retries", status=502) == 1


@pytest.mark.looptime
async def test_rate_limited_counts_each_pause(server, session, metrics):
    server.script("/r", retry_after(429, 60), retry_after(429, 60))
    assert await fetch(session, server.url + "/r", resilient.RateLimitBackoff()) == 200
    attrs = {"key": server.url, "policy": "rate_limit_backoff", "status": 429}
    assert metrics.value("resilient.rate_limited", **attrs) == 2


@pytest.mark.looptime
async def test_circuit_transitions_are_counted_by_state(server, session, metrics):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=10.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    await asyncio.sleep(10.0)
    await fetch(session, server.url + "/r", breaker)
    for state in ("open", "half_open", "closed"):
        assert metrics.value("resilient.circuit.transitions", key=server.url, state=state) == 1


# --- waits ----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_wait_duration_records_the_time_waited(server, session, metrics):
    server.script("/r", retry_after(503, 30))
    assert await fetch(session, server.url + "/r", resilient.Retry(budget=None)) == 200
    (point,) = metrics.points("resilient.wait.duration")
    assert includes(point.attributes, key=server.url, policy="retry", status=503)
    assert point.count == 1
    assert point.sum == pytest.approx(30.0, abs=0.1)


@pytest.mark.looptime
async def test_waiting_counts_callers_during_a_wait_and_returns_to_zero(server, session, metrics):
    server.script("/r", retry_after(429, 3600))
    policy = resilient.RateLimitBackoff()
    call = asyncio.create_task(fetch(session, server.url + "/r", policy))
    while not policy.paused_for(server.url):
        await asyncio.sleep(0.01)
    await asyncio.sleep(60.0)
    assert metrics.value("resilient.waiting", policy="rate_limit_backoff") == 1
    assert await call == 200
    assert metrics.value("resilient.waiting", policy="rate_limit_backoff") == 0


@pytest.mark.looptime
async def test_throttle_waits_are_measured(server, session, metrics):
    throttle = resilient.Throttle(0.5)
    await fetch(session, server.url + "/r", throttle)
    await fetch(session, server.url + "/r", throttle)
    (point,) = metrics.points("resilient.wait.duration")
    assert includes(point.attributes, key=server.url, policy="throttle")
    assert "status" not in point.attributes
    assert point.sum == pytest.approx(2.0, abs=0.05)
    assert metrics.value("resilient.waiting", policy="throttle") == 0


@pytest.mark.looptime
async def test_a_cancelled_waiter_is_no_longer_counted_as_waiting(server, session, metrics):
    throttle = resilient.Throttle(0.01)
    await fetch(session, server.url + "/r", throttle)
    call = asyncio.create_task(fetch(session, server.url + "/r", throttle))
    await asyncio.sleep(1.0)
    assert metrics.value("resilient.waiting", policy="throttle") == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert metrics.value("resilient.waiting", policy="throttle") == 0
    assert metrics.value("resilient.requests", status="CancelledError") == 1


# --- instrumenting --------------------------------------------------------------------


async def test_instrumenting_twice_does_not_count_twice(server, session, metrics):
    again = resilient.instrument_opentelemetry(metrics.provider, metrics.tracer_provider)
    await fetch(session, server.url + "/r", quick_retry())
    assert metrics.value("resilient.requests", policy="retry") == 1
    assert len(metrics.attempts()) == 1
    again()
    assert _metrics.recorder is None


async def test_uninstrument_stops_recording(server, session):
    m = Metrics()
    uninstrument = resilient.instrument_opentelemetry(m.provider, m.tracer_provider)
    await fetch(session, server.url + "/r", quick_retry())
    uninstrument()
    uninstrument()  # idempotent
    await fetch(session, server.url + "/r", quick_retry())
    assert m.value("resilient.requests") == 1
    assert len(m.attempts()) == 1
    m.shutdown()


async def test_a_new_provider_replaces_the_old_one(server, session, metrics):
    other = Metrics()
    uninstrument = resilient.instrument_opentelemetry(other.provider, other.tracer_provider)
    try:
        await fetch(session, server.url + "/r", quick_retry())
    finally:
        uninstrument()
        other.shutdown()
    assert other.value("resilient.requests") == 1
    assert len(other.attempts()) == 1
    assert metrics.value("resilient.requests") == 0
    assert metrics.attempts() == []


def test_a_missing_opentelemetry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'aiohttp-resilient\[otel\]'"):
        resilient.instrument_opentelemetry()


# --- spans: one per request on the wire ----------------------------------------------


async def test_a_call_makes_one_client_span_under_the_callers_span(server, session, metrics):
    policies = (quick_retry(), resilient.CircuitBreaker(), resilient.Throttle(1e3, burst=10))
    with metrics.tracer.start_as_current_span("caller") as caller:
        assert await fetch(session, server.url + "/r", *policies) == 200
    (span,) = metrics.attempts()
    port = URL(server.url).port
    assert span.name == "GET"
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert span.parent.span_id == caller.get_span_context().span_id
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": port,
        "url.full": server.url + "/r",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_a_call_without_a_span_of_its_caller_starts_a_trace(server, session, metrics):
    await fetch(session, server.url + "/r", resilient.Throttle(1e3, burst=10))
    (span,) = metrics.attempts()
    assert span.parent is None


@pytest.mark.looptime
async def test_each_retry_is_a_span_with_its_resend_count(server, session, metrics):
    server.script("/r", retry_after(503, 5), 502)
    with metrics.tracer.start_as_current_span("caller") as caller:
        assert await fetch(session, server.url + "/r", resilient.Retry(budget=None)) == 200
    spans = metrics.attempts()
    assert [s.attributes.get("http.response.status_code") for s in spans] == [503, 502, 200]
    assert [s.attributes.get("http.request.resend_count") for s in spans] == [None, 1, 2]
    assert [s.attributes.get("error.type") for s in spans] == ["503", "502", None]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert {s.parent.span_id for s in spans if s.parent} == {caller.get_span_context().span_id}
    assert spans[1].start_time - spans[0].end_time >= 4.9e9  # the 5 s wait is between them


async def test_a_full_chain_makes_a_span_per_request_sent_not_per_policy(server, session, metrics):
    server.script("/r", retry_after(429, 0), 503)
    policies = (
        quick_retry(),
        resilient.CircuitBreaker(),
        resilient.RateLimitBackoff(),
        resilient.Throttle(1e3, burst=10),
    )
    assert await fetch(session, server.url + "/r", *policies) == 200
    assert server.count("/r") == 3
    spans = metrics.attempts()
    assert [s.attributes["http.response.status_code"] for s in spans] == [429, 503, 200]
    assert [s.attributes.get("http.request.resend_count") for s in spans] == [None, 1, 2]


async def test_a_network_failure_is_a_span_with_the_exception_type(session, metrics):
    with pytest.raises(aiohttp.ClientConnectorError):
        await fetch(session, closed_port_url(), quick_retry(attempts=2))
    spans = metrics.attempts()
    assert len(spans) == 2
    for span in spans:
        assert span.attributes["error.type"] == "ClientConnectorError"
        assert "http.response.status_code" not in span.attributes
        assert span.status.status_code is StatusCode.ERROR
    assert spans[1].attributes["http.request.resend_count"] == 1
    refused = {"error.type": "ClientConnectorError", "status": "ClientConnectorError"}
    assert metrics.value("resilient.requests", **refused) == 1


async def test_a_call_refused_by_an_open_circuit_sends_no_span_but_tells_its_caller(
    server, session, metrics
):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=60.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    with metrics.tracer.start_as_current_span("caller"), pytest.raises(resilient.CircuitOpenError):
        await fetch(session, server.url + "/r", breaker)
    assert len(metrics.attempts()) == 1  # the 500 only
    (caller,) = [s for s in metrics.spans() if s.name == "caller"]
    (event,) = caller.events
    assert event.name == "resilient.circuit_rejected"
    assert includes(event.attributes, **{"resilient.policy": "circuit_breaker"})


async def test_redirect_hops_are_spans_of_one_call(server, session, metrics):
    async def moved(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/b"})

    server.script("/a", moved)
    assert await fetch(session, server.url + "/a", quick_retry()) == 200
    spans = metrics.attempts()
    assert [s.attributes["url.full"] for s in spans] == [server.url + "/a", server.url + "/b"]
    assert [s.attributes.get("http.request.resend_count") for s in spans] == [None, 1]
    assert spans[0].attributes["http.response.status_code"] == 302


@pytest.mark.looptime
async def test_a_span_lasts_as_long_as_its_request(server, session, metrics):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.0)
        return web.Response(text="late")

    server.script("/r", slow)
    await fetch(session, server.url + "/r", resilient.Throttle(1e3, burst=10))
    (span,) = metrics.attempts()
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(2.0, abs=0.05)


async def test_a_method_outside_the_conventions_list_is_other(server, session, metrics):
    async with session.request(
        "PROPFIND", server.url + "/r", middlewares=resilient.chain(quick_retry())
    ) as resp:
        assert resp.status == 200
    (span,) = metrics.attempts()
    assert span.name == "HTTP"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PROPFIND"


@pytest.mark.looptime
async def test_decisions_are_events_on_the_callers_span(server, session, metrics):
    server.script("/r", retry_after(503, 5))
    with metrics.tracer.start_as_current_span("caller"):
        await fetch(session, server.url + "/r", resilient.Retry(budget=None))
    (caller,) = [s for s in metrics.spans() if s.name == "caller"]
    (event,) = caller.events
    assert event.name == "resilient.retry_scheduled"
    assert includes(
        event.attributes,
        **{
            "resilient.policy": "retry",
            "resilient.key": server.url,
            "resilient.attempt": 1,
            "http.response.status_code": 503,
        },
    )
    assert event.attributes["resilient.delay"] == pytest.approx(5.0, abs=0.01)


async def test_nothing_is_traced_once_uninstrumented(server, session):
    m = Metrics()
    resilient.instrument_opentelemetry(m.provider, m.tracer_provider)()
    await fetch(session, server.url + "/r", quick_retry(), resilient.Throttle(1e3, burst=10))
    assert m.spans() == []
    m.shutdown()


# --- metrics by the conventions --------------------------------------------------------


async def test_request_duration_is_recorded_per_request_on_the_wire(server, session, metrics):
    server.script("/r", 503)
    await fetch(session, server.url + "/r", quick_retry(), resilient.Throttle(1e3, burst=10))
    points = metrics.points("http.client.request.duration")
    port = URL(server.url).port
    common = {"http.request.method": "GET", "server.address": "127.0.0.1", "server.port": port}
    by_status = {p.attributes.get("http.response.status_code"): p for p in points}
    assert set(by_status) == {503, 200}
    assert dict(by_status[503].attributes) == {
        **common,
        "http.response.status_code": 503,
        "error.type": "503",
    }
    assert dict(by_status[200].attributes) == {**common, "http.response.status_code": 200}
    assert all(p.count == 1 for p in points)


async def test_calls_carry_the_conventions_attributes_and_the_old_ones(server, session, metrics):
    server.script("/r", 503)
    await fetch(session, server.url + "/r", quick_retry(attempts=1))
    (point,) = metrics.points("resilient.requests")
    assert dict(point.attributes) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": URL(server.url).port,
        "http.response.status_code": 503,
        "error.type": "503",
        "resilient.policy": "retry",
        "resilient.key": server.url,
        "policy": "retry",
        "key": server.url,
        "status": 503,
    }


async def test_retries_name_their_cause_by_the_conventions(server, session, metrics):
    server.script("/r", 503)
    await fetch(session, server.url + "/r", quick_retry())
    assert (
        metrics.value(
            "resilient.retries",
            **{
                "http.response.status_code": 503,
                "error.type": "503",
                "server.address": "127.0.0.1",
            },
        )
        == 1
    )


@pytest.mark.looptime
async def test_circuit_transitions_carry_the_namespaced_state(server, session, metrics):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    assert (
        metrics.value(
            "resilient.circuit.transitions",
            **{"resilient.circuit.state": "open", "resilient.key": server.url},
        )
        == 1
    )


# --- secrets ---------------------------------------------------------------------------

SECRET = "s3cr3t-t0ken"


def every_recorded_value(m: Metrics) -> list[str]:
    """Every attribute value (and span name) recorded: spans, span events, metric points."""
    values: list[str] = []
    for span in m.spans():
        values.append(span.name)
        values.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            values.append(event.name)
            values.extend(str(v) for v in (event.attributes or {}).values())
    data = m.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    values.extend(str(v) for v in point.attributes.values())
    return values


@pytest.mark.looptime
async def test_secrets_never_reach_spans_events_or_metrics(server, session, metrics):
    server.script("/r", retry_after(503, 1), 401, retry_after(503, 1))
    url = (URL(server.url) / "r").with_query({"access_token": SECRET, "page": "2"})
    headers = {"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET, "Cookie": SECRET}
    in_userinfo = url.with_user("alice").with_password(SECRET).with_fragment(SECRET)
    with metrics.tracer.start_as_current_span("caller"):
        retry = resilient.Retry(budget=None)
        assert await fetch(session, str(url), retry, headers=headers) == 401
        assert await fetch(session, str(in_userinfo), retry, headers={"X-Api-Key": SECRET}) == 200
    assert server.arrivals[0].headers["Authorization"] == f"Bearer {SECRET}"  # it was sent
    spans = metrics.attempts()
    assert len(spans) == 4
    values = every_recorded_value(metrics)
    assert any("resilient.retry_scheduled" in v for v in values)
    assert not [v for v in values if SECRET in v or "alice" in v]
    for span in spans:
        assert span.attributes["url.full"].endswith("/r?access_token=REDACTED&page=REDACTED")


def test_url_full_redacts_credentials_and_query_values():
    url = URL("https://user:pw@api.example.com:8443/v3/items?token=abc&sig=x&flag#frag")
    assert url_full(url) == (
        "https://REDACTED:REDACTED@api.example.com:8443/v3/items"
        "?token=REDACTED&sig=REDACTED&flag=REDACTED"
    )
    assert url_full(URL("http://h/p")) == "http://h/p"
    assert url_full(URL("http://user@h/")) == "http://REDACTED:REDACTED@h/"


# --- Hedge and ConcurrencyLimit ------------------------------------------------------


def answer_after(seconds: float) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="late")

    return reply


@pytest.mark.looptime
async def test_a_hedged_call_is_one_call_with_a_span_per_copy(server, session, metrics):
    server.script("/r", answer_after(10.0))
    with metrics.tracer.start_as_current_span("caller") as caller:
        assert await fetch(session, server.url + "/r", resilient.Hedge(delay=0.5)) == 200
    await asyncio.sleep(0.01)  # the loser's cancellation lands
    assert metrics.value("resilient.requests", **{"resilient.policy": "hedge"}) == 1
    assert metrics.value("resilient.hedges", **{"resilient.hedge.outcome": "sent"}) == 1
    assert metrics.value("resilient.hedges", **{"resilient.hedge.outcome": "won"}) == 1
    spans = metrics.attempts()
    assert len(spans) == 2
    assert {s.parent.span_id for s in spans if s.parent} == {caller.get_span_context().span_id}
    assert sorted(str(s.attributes.get("error.type")) for s in spans) == [
        "CancelledError", "None"
    ]  # fmt: skip


@pytest.mark.looptime
async def test_limit_refusals_are_counted_by_reason(server, session, metrics):
    server.script("/r", answer_after(1.0))
    limit = resilient.ConcurrencyLimit(1, max_queue=0)
    first = asyncio.create_task(fetch(session, server.url + "/r", limit))
    while not server.arrivals:
        await asyncio.sleep(0.01)
    with pytest.raises(resilient.LimitExceeded):
        await fetch(session, server.url + "/r", limit)
    await first
    assert metrics.value("resilient.limit.rejected", **{"resilient.reason": "queue full"}) == 1
    assert metrics.value("resilient.requests", status="LimitExceeded") == 1
