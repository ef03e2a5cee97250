"""The five clients compared side by side, behind one small interface.

Each is an async context manager with ``await client.request(method, url, headers=...)``
returning the final status after reading the body (an exception propagates). ``scale``
multiplies every client-side delay (backoff bases and caps, fixed sleeps, breaker
windows) so that a scenario whose server-side times are scaled down stays comparable.

- ``aiohttp``: a plain ``aiohttp.ClientSession``, one attempt.
- ``resilient``: ``resilient.session(Retry, CircuitBreaker, RateLimitBackoff, Throttle)``,
  the full chain with its defaults (scaled), Throttle configured per scenario.
- ``aiohttp-retry``: ``RetryClient()`` with its defaults (``ExponentialRetry``: 3 attempts,
  0.1 s x 2^n, every 5xx, not 429).
- ``tenacity``: an ``AsyncRetrying`` loop, the usual recipe: 4 attempts, retry on 429/5xx
  and ``aiohttp.ClientError``, ``wait_exponential_jitter(max=60)``.
- ``naive``: up to 4 attempts with a fixed 1 s sleep on 429/5xx or a ClientError.

Variants for scenarios that compare configurations (not in ``CLIENTS``):
:class:`ChainClient` (``resilient.session(*policies())`` with exactly the policies
given, the library's own defaults, nothing scaled; see :func:`default_chain`) and
:class:`AiohttpRetry429Client` (aiohttp-retry with 429 added to its statuses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Self

import aiohttp
from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse

from ._harness import BUSINESS, Outcome

__all__ = [
    "CLIENTS",
    "AiohttpRetry429Client",
    "ChainClient",
    "Client",
    "ClientSpec",
    "OnePassthroughClient",
    "PassthroughClient",
    "ResilientOptions",
    "build_policies",
    "default_chain",
    "launch",
    "make_clients",
    "timed",
]

CLIENTS = ("aiohttp", "resilient", "aiohttp-retry", "tenacity", "naive")
ATTEMPTS = 4
"""Attempts (first try included) of the tenacity and naive loops, as resilient's Retry."""
NAIVE_SLEEP = 1.0
HEADERS = {"X-Business": BUSINESS}
PLAIN = "resilient chain on ClientSession"
"""Label of resilient's chain on a plain ``aiohttp.ClientSession`` (no ``session()``
timeouts): ``ResilientOptions(plain_session=True)``."""


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


class Client:
    """A plain aiohttp session: one attempt per call."""

    name = "aiohttp"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def __aenter__(self) -> Self:
        self.session = self._session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _once(self, method: str, url: str, headers: dict[str, str]) -> int:
        assert self.session is not None
        async with self.session.request(method, url, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def request(self, method: str, url: str, headers: dict[str, str] = HEADERS) -> int:
        return await self._once(method, url, headers)


@dataclass(frozen=True)
class ResilientOptions:
    """How a scenario configures resilient's chain (the rest are the library's defaults)."""

    throttle_rate: float = 1e6
    throttle_burst: int = 1000
    throttle_quotas: str | None = None
    budget: bool = True
    plain_session: bool = False
    """Use the chain on a plain ``aiohttp.ClientSession`` (aiohttp's default timeout)
    instead of ``resilient.session()``."""
    extra: tuple[ClientMiddlewareType, ...] = ()


def build_policies(options: ResilientOptions, scale: float = 1.0) -> tuple[Any, ...]:
    """The four policies with their defaults, delays multiplied by ``scale``."""
    import resilient

    retry_kw: dict[str, Any] = {"backoff": resilient.FullJitter(base=0.5 * scale, cap=30.0 * scale)}
    if not options.budget:
        retry_kw["budget"] = None
    return (
        resilient.Retry(**retry_kw),
        resilient.CircuitBreaker(window=2.0 * scale, open_for=0.5 * scale, max_open_for=scale),
        resilient.RateLimitBackoff(),
        resilient.Throttle(
            options.throttle_rate, burst=options.throttle_burst, quotas=options.throttle_quotas
        ),
        *options.extra,
    )


async def passthrough(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """A middleware that does nothing: measures aiohttp's own cost per middleware."""
    return await handler(request)


class PassthroughClient(Client):
    """A plain session with four do-nothing middlewares (aiohttp's middleware machinery)."""

    name = "aiohttp + 4 no-op middlewares"
    count = 4

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(middlewares=(passthrough,) * self.count)


class OnePassthroughClient(PassthroughClient):
    """One do-nothing middleware: the least any middleware-based client costs."""

    name = "aiohttp + 1 no-op middleware"
    count = 1


class ResilientClient(Client):
    name = "resilient"

    def __init__(self, scale: float = 1.0, options: ResilientOptions | None = None) -> None:
        super().__init__(scale)
        self.options = options or ResilientOptions()

    def _session(self) -> aiohttp.ClientSession:
        import resilient

        policies = build_policies(self.options, self.scale)
        if self.options.plain_session:
            return aiohttp.ClientSession(middlewares=resilient.chain(*policies))
        return resilient.session(*policies)


class AiohttpRetryClient(Client):
    name = "aiohttp-retry"

    async def __aenter__(self) -> Self:
        from aiohttp_retry import ExponentialRetry, RetryClient

        s = self.scale
        options = ExponentialRetry(start_timeout=0.1 * s, max_timeout=30.0 * s)
        self.session = aiohttp.ClientSession()
        self.retry_client = RetryClient(client_session=self.session, retry_options=options)
        return self

    async def request(self, method: str, url: str, headers: dict[str, str] = HEADERS) -> int:
        async with self.retry_client.request(method, url, headers=headers) as resp:
            await resp.read()
            return resp.status


class AiohttpRetry429Client(AiohttpRetryClient):
    """aiohttp-retry as a user would set it up for a rate-limited API: ``ExponentialRetry``
    with 429 added to its statuses (besides every 5xx), :data:`ATTEMPTS` attempts."""

    name = "aiohttp-retry +429"

    async def __aenter__(self) -> Self:
        from aiohttp_retry import ExponentialRetry, RetryClient

        s = self.scale
        options = ExponentialRetry(
            attempts=ATTEMPTS, statuses={429}, start_timeout=0.1 * s, max_timeout=30.0 * s
        )
        self.session = aiohttp.ClientSession()
        self.retry_client = RetryClient(client_session=self.session, retry_options=options)
        return self


def default_chain(*extra: Any) -> tuple[Any, ...]:
    """``Retry(), CircuitBreaker(), RateLimitBackoff()`` with the library's defaults (no
    Throttle: the server's rate is not known), then ``extra`` policies."""
    import resilient

    return (resilient.Retry(), resilient.CircuitBreaker(), resilient.RateLimitBackoff(), *extra)


class ChainClient(Client):
    """``resilient.session(*policies())``: exactly these policies, nothing scaled."""

    name = "resilient (chain)"

    def __init__(self, policies: Callable[[], Sequence[Any]] = default_chain) -> None:
        super().__init__()
        self.policies = policies

    def _session(self) -> aiohttp.ClientSession:
        import resilient

        return resilient.session(*self.policies())


class TenacityClient(Client):
    name = "tenacity"

    async def __aenter__(self) -> Self:
        import tenacity

        s = self.scale
        self.retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(ATTEMPTS),
            wait=tenacity.wait_exponential_jitter(multiplier=s, max=60.0 * s, jitter=s),
            retry=(
                tenacity.retry_if_exception_type(aiohttp.ClientError)
                | tenacity.retry_if_result(_retryable)
            ),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        return await super().__aenter__()

    async def request(self, method: str, url: str, headers: dict[str, str] = HEADERS) -> int:
        status: int = await self.retrying.copy()(self._once, method, url, headers)
        return status


class NaiveClient(Client):
    name = "naive"

    async def request(self, method: str, url: str, headers: dict[str, str] = HEADERS) -> int:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                status = await self._once(method, url, headers)
            except aiohttp.ClientError:
                if attempt == ATTEMPTS:
                    raise
            else:
                if not _retryable(status) or attempt == ATTEMPTS:
                    return status
            await asyncio.sleep(NAIVE_SLEEP * self.scale)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class ClientSpec:
    """A named client factory (``label`` distinguishes variants such as budget off)."""

    label: str
    factory: Callable[[], Client]


def make_clients(
    scale: float = 1.0,
    options: ResilientOptions | None = None,
    names: Sequence[str] = CLIENTS,
    variants: Sequence[tuple[str, ResilientOptions]] = (),
) -> list[ClientSpec]:
    """Specs for ``names`` (in that order); ``variants`` adds resilient configurations
    right after the ``resilient`` entry."""
    classes: dict[str, type[Client]] = {
        "aiohttp": Client,
        "aiohttp-retry": AiohttpRetryClient,
        "tenacity": TenacityClient,
        "naive": NaiveClient,
    }
    specs: list[ClientSpec] = []
    for name in names:
        if name == "resilient":
            specs.append(ClientSpec(name, partial(ResilientClient, scale, options)))
            for label, variant in variants:
                specs.append(ClientSpec(label, partial(ResilientClient, scale, variant)))
        else:
            specs.append(ClientSpec(name, partial(classes[name], scale)))
    return specs


async def timed(
    client: Client, method: str, url: str, headers: dict[str, str] = HEADERS
) -> Outcome:
    """One call as an :class:`Outcome` (loop-clock start/end; exceptions captured)."""
    loop = asyncio.get_running_loop()
    start, wall0 = loop.time(), time.perf_counter()
    try:
        status = await client.request(method, url, headers)
    except (TimeoutError, aiohttp.ClientError) as exc:
        error: str | None = type(exc).__name__
        status = None
    else:
        error = None
    return Outcome(status, error, start, loop.time(), time.perf_counter() - wall0)


def cpu_now() -> float:
    """Process CPU seconds (user + system) of this process."""
    return time.process_time()


async def launch(
    client: Client, url: str, arrivals: Sequence[float], method: str = "GET"
) -> list[Outcome]:
    """One call per entry of ``arrivals`` (seconds from now, loop clock); all outcomes."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(at: float) -> Outcome:
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return await timed(client, method, url)

    return list(await asyncio.gather(*(one(at) for at in arrivals)))
