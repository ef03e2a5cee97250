"""OpenTelemetry metrics: :func:`instrument_opentelemetry`.

``opentelemetry-api`` is an optional dependency (``pip install 'resilient[otel]'``),
imported only when this function is called. Instruments (attributes: ``key``,
``policy``, and ``status`` where one is known):

- ``resilient.requests`` (counter): calls, counted once each by the outermost
  ``resilient`` policy (``policy`` names it; retries are not new calls), ``status`` =
  the HTTP status returned or the exception's class name.
- ``resilient.retries`` (counter): retries scheduled (``status``: the status or the
  network error that caused it).
- ``resilient.rate_limited`` (counter): 429 pauses started.
- ``resilient.circuit.transitions`` (counter): with ``state`` = ``open``,
  ``half_open`` or ``closed``.
- ``resilient.wait.duration`` (histogram, seconds): every wait, as waited.
- ``resilient.waiting`` (up-down counter): callers waiting now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _events, _metrics
from ._events import Event

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.util.types import Attributes

__all__ = ["INSTRUMENTATION_NAME", "instrument_opentelemetry"]

INSTRUMENTATION_NAME = "resilient"
"""The OpenTelemetry meter name (instrumentation scope)."""

_TRANSITIONS = {
    "circuit_opened": "open",
    "circuit_half_open": "half_open",
    "circuit_closed": "closed",
}


class _Recorder:
    """The OpenTelemetry backend of :mod:`resilient._metrics` plus an event hook."""

    def __init__(self, meter: Meter, provider: object) -> None:
        self.provider = provider
        self.remove_hook: Callable[[], None] = _noop
        self._requests = meter.create_counter(
            "resilient.requests", unit="{request}", description="Calls, by final status"
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
        self._wait = meter.create_histogram(
            "resilient.wait.duration", unit="s", description="Seconds each wait lasted"
        )
        self._waiting = meter.create_up_down_counter(
            "resilient.waiting", unit="{caller}", description="Callers waiting now"
        )

    def request(self, policy: str, key: str, status: int | str) -> None:
        self._requests.add(1, {"key": key, "policy": policy, "status": status})

    def wait_started(self, policy: str, key: str) -> None:
        self._waiting.add(1, {"key": key, "policy": policy})

    def wait_ended(self, policy: str, key: str, status: int | None, seconds: float) -> None:
        self._waiting.add(-1, {"key": key, "policy": policy})
        self._wait.record(max(seconds, 0.0), _attributes(key, policy, status))

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == "retry_scheduled":
            status = event.status if event.status is not None else event.reason
            self._retries.add(1, _attributes(event.key, event.policy, status))
        elif kind == "rate_limited":
            self._rate_limited.add(1, _attributes(event.key, event.policy, event.status))
        elif kind in _TRANSITIONS:
            attrs = {"key": event.key, "policy": event.policy, "state": _TRANSITIONS[kind]}
            self._transitions.add(1, attrs)


def _attributes(key: str, policy: str, status: int | str | None) -> Attributes:
    if status is None or status == "":
        return {"key": key, "policy": policy}
    return {"key": key, "policy": policy, "status": status}


def _noop() -> None:
    pass


_active: _Recorder | None = None


def instrument_opentelemetry(meter_provider: MeterProvider | None = None) -> Callable[[], None]:
    """Record ``resilient``'s metrics with OpenTelemetry; returns ``uninstrument()``.

    ``meter_provider``: default the global one (``opentelemetry.metrics``). Calling it
    again with the same provider returns the same ``uninstrument`` (nothing is counted
    twice); with another provider, the new one replaces the old.
    """
    global _active
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        raise ImportError(
            "resilient.instrument_opentelemetry needs the OpenTelemetry API:"
            " pip install 'resilient[otel]'"
        ) from exc
    from . import __version__

    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    current = _active
    if current is not None:
        if current.provider is provider:
            return lambda: _uninstall(current)
        _uninstall(current)
    recorder = _Recorder(provider.get_meter(INSTRUMENTATION_NAME, __version__), provider)
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
