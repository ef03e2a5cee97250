"""OpenTelemetry: :func:`instrument_opentelemetry`, by the HTTP semantic conventions.

``opentelemetry-api`` is an optional dependency (``pip install 'aiohttp-resilient[otel]'``),
imported only when this function is called.

**Spans.** One ``CLIENT`` span per request that reaches the wire (each retry, each re-send
after a 429 pause or a token refresh, each hedge), a child of the caller's current span,
named for the method (``GET``; ``HTTP`` for a method outside the conventions' list).
Attributes: ``http.request.method`` (``_OTHER`` plus ``http.request.method_original``
for other methods), ``server.address``, ``server.port``, ``url.full`` (user:password
replaced by ``REDACTED:REDACTED``, every query value by ``REDACTED``, no fragment),
``http.response.status_code``, ``http.request.resend_count`` (from the second request
of the call on, redirects included) and ``error.type`` (the status code for 4xx/5xx,
else the exception's class name); the span's status is ``ERROR`` with ``error.type``.
No header, body or exception message is ever recorded. A call that sends nothing (an
open circuit, a wait beyond the deadline) has no span; its events do (below). The spans
are recorded when an attempt ends, with its start time; trace context is not injected
into the request (``opentelemetry-instrumentation-aiohttp-client`` does that, for the
call as a whole, and its span is then the parent of ours).

**Span events.** Every :class:`resilient.Event` is added to the caller's current span
(if it records) as the event ``resilient.<kind>`` with ``resilient.policy``,
``resilient.key``, ``resilient.attempt``, ``resilient.delay`` (s),
``resilient.reason`` and ``http.response.status_code`` when known.

**Metrics.** ``http.client.request.duration`` (histogram, s): one point per request on
the wire, with ``http.request.method``, ``server.address``, ``server.port``,
``http.response.status_code`` and ``error.type``. Then ``resilient``'s own instruments,
each with ``resilient.policy``, ``resilient.key`` and, within a call, the
``http.request.method``, ``server.address`` and ``server.port`` of its request; the
outcome as ``http.response.status_code`` and/or ``error.type`` (as above):

- ``resilient.requests`` (counter): calls, counted once each by the outermost
  ``resilient`` policy (retries are not new calls), by final outcome.
- ``resilient.retries`` (counter): retries scheduled, by the outcome that caused them.
- ``resilient.rate_limited`` (counter): 429 pauses started.
- ``resilient.circuit.transitions`` (counter): with ``resilient.circuit.state`` =
  ``open``, ``half_open`` or ``closed``.
- ``resilient.wait.duration`` (histogram, s): every wait, as waited.
- ``resilient.waiting`` (up-down counter): callers waiting now.
- ``resilient.hedges`` (counter): ``Hedge`` decisions, with ``resilient.hedge.outcome``
  = ``sent`` (a copy went), ``won`` (a copy answered first) or ``skipped`` (the budget
  refused a copy).
- ``resilient.limit.rejected`` (counter): callers ``ConcurrencyLimit`` refused
  (``LimitExceeded``), with ``resilient.reason`` (``queue full`` or ``deadline``).

The attributes of 0.1.0, ``key``, ``policy``, ``status`` (the status, or the exception's
class name) and ``state``, are still recorded alongside: deprecated, to be removed in
0.3.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from aiohttp import ClientRequest, ClientResponse
from yarl import URL

from . import _events, _metrics
from ._events import Event

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["INSTRUMENTATION_NAME", "instrument_opentelemetry", "url_full"]

INSTRUMENTATION_NAME = "resilient"
"""The OpenTelemetry meter and tracer name (instrumentation scope)."""

REDACTED = "REDACTED"
"""What replaces user:password and every query value in ``url.full``."""

KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
"""Methods the HTTP conventions name; any other is ``_OTHER``."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
"""The conventions' advice for ``http.client.request.duration`` (seconds)."""

_TRANSITIONS = {
    "circuit_opened": "open",
    "circuit_half_open": "half_open",
    "circuit_closed": "closed",
}
_HEDGES = {"hedge_sent": "sent", "hedge_won": "won", "hedge_skipped": "skipped"}

_CACHE = "_resilient_otel"
"""Where a request keeps its conventions' attributes (computed once per request)."""

_URL_CACHE = "_resilient_url_full"

Attrs = dict[str, Any]


def url_full(url: URL) -> str:
    """``url`` for ``url.full``: credentials and every query value ``REDACTED``, no
    fragment (the conventions' rule, applied to every query parameter: a token or a
    signature may hide under any name)."""
    url = url.with_fragment(None)
    if url.raw_user is not None or url.raw_password is not None:
        url = url.with_user(REDACTED).with_password(REDACTED)
    if url.raw_query_string:
        url = url.with_query([(name, REDACTED) for name in url.query])
    return str(url)


def _request_attributes(request: ClientRequest) -> Attrs:
    """``http.request.method``, ``server.address``, ``server.port`` of ``request``."""
    cache = vars(request)
    attrs: Attrs | None = cache.get(_CACHE)
    if attrs is None:
        method, url = request.method, request.url
        attrs = {"http.request.method": method if method in KNOWN_METHODS else "_OTHER"}
        if url.host is not None:
            attrs["server.address"] = url.host
        if url.port is not None:
            attrs["server.port"] = url.port
        cache[_CACHE] = attrs
    return attrs


def _url_full_of(request: ClientRequest) -> str:
    """:func:`url_full` of ``request``, computed once per request (retries re-send it)."""
    cache = vars(request)
    full: str | None = cache.get(_URL_CACHE)
    if full is None:
        full = cache[_URL_CACHE] = url_full(request.url)
    return full


def _outcome(attrs: Attrs, outcome: int | BaseException | None) -> Attrs:
    """``attrs`` plus the conventions' outcome: ``http.response.status_code`` and
    ``error.type`` (the status code from 400 on, or the exception's class name)."""
    if isinstance(outcome, BaseException):
        attrs["error.type"] = type(outcome).__qualname__
    elif outcome is not None:
        attrs["http.response.status_code"] = outcome
        if outcome >= 400:
            attrs["error.type"] = str(outcome)
    return attrs


def _legacy_status(outcome: int | BaseException) -> int | str:
    return type(outcome).__name__ if isinstance(outcome, BaseException) else outcome


class _Recorder:
    """The OpenTelemetry backend of :mod:`resilient.observe._metrics`, plus an event hook."""

    def __init__(self, meter: Meter, tracer: Tracer, providers: tuple[object, object]) -> None:
        from opentelemetry import context, trace

        self.providers = providers
        self.remove_hook: Callable[[], None] = _noop
        self._tracer = tracer
        self._current_context = context.get_current
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._duration = _histogram(
            meter,
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests (each request on the wire).",
            buckets=DURATION_BUCKETS,
        )
        self._requests = meter.create_counter(
            "resilient.requests", unit="{request}", description="Calls, by final outcome"
        )
        self._retries = meter.create_counter(
            "resilient.retries", unit="{retry}", description="Retries scheduled"
        )
        self._rate_limited = meter.create_counter(
            "resilient.rate_limited", unit="{pause}", description="429 pauses started"
        )
        self._transitions = meter.create_counter(
            "resilient.circuit.transitions",
            unit="{transition}",
            description="Circuit breaker state changes",
        )
        self._wait = _histogram(
            meter, "resilient.wait.duration", unit="s", description="Seconds each wait lasted"
        )
        self._waiting = meter.create_up_down_counter(
            "resilient.waiting", unit="{caller}", description="Callers waiting now"
        )
        self._hedges = meter.create_counter(
            "resilient.hedges", unit="{hedge}", description="Hedged copies sent, won, skipped"
        )
        self._limit_rejected = meter.create_counter(
            "resilient.limit.rejected",
            unit="{request}",
            description="Callers refused by a concurrency limit (nothing sent)",
        )

    # -- calls and waits (resilient.observe._metrics.Recorder) ----------------------------------

    def request(
        self, policy: str, key: str, request: ClientRequest, status: int | BaseException
    ) -> None:
        attrs = _policy_attributes(policy, key, _request_attributes(request))
        attrs["status"] = _legacy_status(status)
        self._requests.add(1, _outcome(attrs, status))

    def wait_started(self, policy: str, key: str) -> None:
        self._waiting.add(1, _policy_attributes(policy, key, _call_attributes()))

    def wait_ended(self, policy: str, key: str, status: int | None, seconds: float) -> None:
        attrs = _policy_attributes(policy, key, _call_attributes())
        self._waiting.add(-1, attrs)
        if status is not None:
            attrs = _outcome({**attrs, "status": status}, status)
        self._wait.record(max(seconds, 0.0), attrs)

    # -- requests on the wire -----------------------------------------------------------

    def attempt_started(self) -> Context:
        return self._current_context()  # the caller's: its span is the parent

    def attempt_ended(
        self,
        request: ClientRequest,
        started: object,
        start: float,
        seconds: float,
        resends: int,
        outcome: ClientResponse | BaseException,
    ) -> None:
        parent = cast("Context", started)  # what attempt_started returned
        seconds = max(seconds, 0.0)
        start_ns = int(start * 1e9)
        result = outcome if isinstance(outcome, BaseException) else outcome.status
        metric = _outcome(dict(_request_attributes(request)), result)
        self._duration.record(seconds, metric)
        attrs = dict(metric)
        method = request.method
        if attrs["http.request.method"] == "_OTHER":
            attrs["http.request.method_original"] = method
        attrs["url.full"] = _url_full_of(request)
        if resends:
            attrs["http.request.resend_count"] = resends
        span = self._tracer.start_span(
            method if method in KNOWN_METHODS else "HTTP",
            context=parent,
            kind=self._client,
            attributes=attrs,
            start_time=start_ns,
        )
        if "error.type" in attrs:
            span.set_status(self._error)
        span.end(end_time=start_ns + int(seconds * 1e9))

    # -- events -------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == "retry_scheduled":
            cause: int | str = event.status if event.status is not None else event.reason
            attrs = _policy_attributes(event.policy, event.key, _call_attributes())
            attrs["status"] = cause
            if isinstance(cause, int):
                _outcome(attrs, cause)
            elif cause:
                attrs["error.type"] = cause
            self._retries.add(1, attrs)
        elif kind == "rate_limited":
            attrs = _policy_attributes(event.policy, event.key, _call_attributes())
            if event.status is not None:
                attrs["status"] = event.status
                _outcome(attrs, event.status)
            self._rate_limited.add(1, attrs)
        elif kind in _TRANSITIONS:
            attrs = _policy_attributes(event.policy, event.key, {})
            attrs["resilient.circuit.state"] = attrs["state"] = _TRANSITIONS[kind]
            self._transitions.add(1, attrs)
        elif kind in _HEDGES:
            attrs = _policy_attributes(event.policy, event.key, _call_attributes())
            attrs["resilient.hedge.outcome"] = _HEDGES[kind]
            self._hedges.add(1, attrs)
        elif kind == "limit_rejected":
            attrs = _policy_attributes(event.policy, event.key, _call_attributes())
            attrs["resilient.reason"] = event.reason.split(" (", 1)[0]
            self._limit_rejected.add(1, attrs)
        _span_event(event)


def _policy_attributes(policy: str, key: str, base: Mapping[str, Any]) -> Attrs:
    """``base`` plus the policy and key, under the new names and the deprecated ones."""
    return {**base, "resilient.policy": policy, "resilient.key": key, "policy": policy, "key": key}


def _call_attributes() -> Mapping[str, Any]:
    """The request attributes of the call this task is in (none outside a call)."""
    request = _metrics.current_request()
    return {} if request is None else _request_attributes(request)


def _span_event(event: Event) -> None:
    """``event`` on the caller's current span, if that span records."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    attrs: Attrs = {"resilient.policy": event.policy, "resilient.key": event.key}
    if event.attempt:
        attrs["resilient.attempt"] = event.attempt
    if event.delay is not None:
        attrs["resilient.delay"] = event.delay
    if event.status is not None:
        attrs["http.response.status_code"] = event.status
    if event.reason:
        attrs["resilient.reason"] = event.reason
    span.add_event("resilient." + event.kind, attrs)


def _histogram(
    meter: Meter, name: str, *, unit: str, description: str, buckets: tuple[float, ...] = ()
) -> Any:
    """A histogram, with bucket advice where the API knows it (opentelemetry-api 1.23+)."""
    if buckets:
        try:
            return meter.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=buckets,
            )
        except TypeError:  # pragma: no cover - older opentelemetry-api
            pass
    return meter.create_histogram(name, unit=unit, description=description)


def _noop() -> None:
    pass


_active: _Recorder | None = None


def instrument_opentelemetry(
    meter_provider: MeterProvider | None = None, tracer_provider: TracerProvider | None = None
) -> Callable[[], None]:
    """Record ``resilient``'s spans and metrics with OpenTelemetry; returns
    ``uninstrument()``.

    ``meter_provider``, ``tracer_provider``: default the global ones
    (``opentelemetry.metrics``, ``opentelemetry.trace``). Calling it again with the same
    providers returns the same ``uninstrument`` (nothing is recorded twice); with other
    providers, the new ones replace the old. What is recorded: the module docstring of
    ``resilient.observe._otel`` and the documentation's "Observability" page.
    """
    global _active
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:
        raise ImportError(
            "resilient.instrument_opentelemetry needs the OpenTelemetry API:"
            " pip install 'aiohttp-resilient[otel]'"
        ) from exc
    from .. import __version__

    meters = metrics.get_meter_provider() if meter_provider is None else meter_provider
    tracers = trace.get_tracer_provider() if tracer_provider is None else tracer_provider
    current = _active
    if current is not None:
        if current.providers[0] is meters and current.providers[1] is tracers:
            return lambda: _uninstall(current)
        _uninstall(current)
    recorder = _Recorder(
        meters.get_meter(INSTRUMENTATION_NAME, __version__),
        tracers.get_tracer(INSTRUMENTATION_NAME, __version__),
        (meters, tracers),
    )
    recorder.remove_hook = _events.add_hook(recorder.on_event)
    _metrics.recorder = recorder
    _active = recorder
    return lambda: _uninstall(recorder)


def _uninstall(recorder: _Recorder) -> None:
    """Stop ``recorder`` (no-op if it was already replaced or removed)."""
    global _active
    recorder.remove_hook()
    recorder.remove_hook = _noop
    if _active is recorder:
        _active = None
        _metrics.recorder = None
