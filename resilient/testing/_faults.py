"""FaultInjection: a client middleware that makes trouble on purpose (chaos testing).

Like Polly's chaos strategies: with seeded probabilities it answers a request itself
with a synthetic 503 or 429 (nothing is sent), raises a connection error before
sending, or adds latency before sending. Placed innermost by :func:`resilient.chain`,
so every wire attempt of the policies above it rolls the dice again.
"""

from __future__ import annotations

import errno
import json
import math
import random
from http import HTTPStatus

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from .. import _clock
from .._policy import Policy
from .._validate import number, optional_number

__all__ = ["DEFAULT_INJECTED_RETRY_AFTER", "FAULT_HEADER", "FaultInjection", "synthetic_response"]

DEFAULT_INJECTED_RETRY_AFTER = 1.0
"""Seconds announced by ``Retry-After`` on injected 429s."""
FAULT_HEADER = "X-Resilient-Fault"
"""Header on every synthetic response, naming the injected fault."""
_STREAM_LIMIT = 2**16


def _check_rate(name: str, value: float) -> None:
    number("FaultInjection", name, value, 0.0, 1.0)


class FaultInjection(Policy):
    """Inject faults at seeded rates; each rate is a probability per wire attempt.

    Per request: with ``latency_rate``, first wait ``latency`` seconds (loop clock).
    Then one draw ``u`` in [0, 1) picks at most one fault:
    ``u < connection_error_rate`` -> raise :class:`aiohttp.ClientConnectorError`
    (ECONNREFUSED: "failed to connect", so safe to retry for any method); next
    ``error_rate`` -> a synthetic 503; next ``rate_limit_rate`` -> a synthetic 429 with
    ``Retry-After: ceil(retry_after)`` (none if ``retry_after`` is None); else the
    request goes to the wire. The three fault rates must sum to at most 1.
    ``injected`` counts what was injected: ``connection_error``, ``error``,
    ``rate_limit``, ``latency``.
    """

    __slots__ = (
        "_connection_error_rate",
        "_error_rate",
        "_headers_429",
        "_latency",
        "_latency_rate",
        "_random",
        "_rate_limit_rate",
        "_retry_after",
        "injected",
    )

    kind = "fault_injection"
    order = 50

    def __init__(
        self,
        *,
        error_rate: float = 0.0,
        rate_limit_rate: float = 0.0,
        retry_after: float | None = DEFAULT_INJECTED_RETRY_AFTER,
        latency: float = 0.0,
        latency_rate: float = 0.0,
        connection_error_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        _check_rate("error_rate", error_rate)
        _check_rate("rate_limit_rate", rate_limit_rate)
        _check_rate("latency_rate", latency_rate)
        _check_rate("connection_error_rate", connection_error_rate)
        if error_rate + rate_limit_rate + connection_error_rate > 1.0 + 1e-12:
            raise ValueError(
                "FaultInjection: error_rate + rate_limit_rate + connection_error_rate must be"
                f" at most 1, got {error_rate + rate_limit_rate + connection_error_rate!r}"
            )
        optional_number("FaultInjection", "retry_after", retry_after, 0.0, math.inf, high_open=True)
        number("FaultInjection", "latency", latency, 0.0, math.inf, high_open=True)
        self._error_rate = error_rate
        self._rate_limit_rate = rate_limit_rate
        self._retry_after = retry_after
        self._latency = latency
        self._latency_rate = latency_rate
        self._connection_error_rate = connection_error_rate
        self._random = random.Random(seed)
        self._headers_429 = (
            {} if retry_after is None else {"Retry-After": str(math.ceil(retry_after))}
        )
        self.injected: dict[str, int] = dict.fromkeys(
            ("connection_error", "error", "rate_limit", "latency"), 0
        )

    def __repr__(self) -> str:
        return (
            f"FaultInjection(error_rate={self._error_rate},"
            f" rate_limit_rate={self._rate_limit_rate},"
            f" connection_error_rate={self._connection_error_rate},"
            f" latency={self._latency}, latency_rate={self._latency_rate})"
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        draw = self._random.random
        if self._latency_rate and draw() < self._latency_rate:
            self.injected["latency"] += 1
            await _clock.sleep(self._latency)
        u = draw()
        if u < self._connection_error_rate:
            self.injected["connection_error"] += 1
            refused = ConnectionRefusedError(
                errno.ECONNREFUSED, "Connection refused (injected by FaultInjection)"
            )
            raise aiohttp.ClientConnectorError(request.connection_key, refused)
        u -= self._connection_error_rate
        if u < self._error_rate:
            self.injected["error"] += 1
            return synthetic_response(request, 503, "ServiceUnavailable", fault="error")
        u -= self._error_rate
        if u < self._rate_limit_rate:
            self.injected["rate_limit"] += 1
            return synthetic_response(
                request, 429, "TooManyRequests", fault="rate_limit", headers=self._headers_429
            )
        return await handler(request)


def synthetic_response(
    request: ClientRequest,
    status: int,
    data_code: str,
    *,
    fault: str,
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    """A finished :class:`aiohttp.ClientResponse` for ``request`` that never touched the wire.

    Why the private parts: aiohttp has no public way to build a client response
    without a connection. We build one from aiohttp's own classes the way
    ``ClientRequest.send`` and ``ClientResponse.start`` do (status line, headers, a
    ``StreamReader`` fed with the body and EOF), with no connection, so ``read()``,
    ``text()``, ``json()``, ``release()``, ``raise_for_status()`` and ``async with``
    behave as for a real response. Kept to this one function.
    """
    loop = request.loop
    body = json.dumps(
        [
            {
                "$severity": "error",
                "$dataCode": data_code,
                "$message": f"Injected by resilient.testing.FaultInjection ({fault}).",
                "$source": "",
            }
        ]
    ).encode()
    all_headers = CIMultiDict(
        {
            "Content-Type": "application/json; charset=utf-8",
            "Content-Length": str(len(body)),
            FAULT_HEADER: fault,
            **(headers or {}),
        }
    )
    protocol = BaseProtocol(loop)
    response = request.response_class(
        request.method,
        request.original_url,
        writer=None,
        continue100=None,
        timer=TimerNoop(),
        request_info=request.request_info,
        traces=[],
        loop=loop,
        session=request.session,
        stream_writer=StreamWriter(protocol, loop),
    )
    response.version = HttpVersion11
    response.status = status
    response.reason = HTTPStatus(status).phrase
    response._headers = CIMultiDictProxy(all_headers)
    response._raw_headers = tuple((k.encode(), v.encode()) for k, v in all_headers.items())
    content = StreamReader(protocol, _STREAM_LIMIT, loop=loop)
    content.feed_data(body)
    content.feed_eof()
    response.content = content
    return response
