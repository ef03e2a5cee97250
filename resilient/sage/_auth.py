"""TokenRefresh: refresh an expired Sage access token once, shared, and re-send.

Sage access tokens live 5 minutes. A 401 whose ``$dataCode`` is
``AccessTokenExpiredError`` means "refresh and retry"; any other 401 means the
user must authorise again and stored refresh tokens must be dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs

from .._errors import BodyNotReplayable, ResilienceError
from .._keys import by_host
from .._policy import Policy
from ..observe import _events, _metrics
from ..observe._log import logger
from ._errors import parse_errors

__all__ = [
    "EXPIRED_DATA_CODE",
    "MAX_AUTH_BODY",
    "MAX_STALE_TOKENS",
    "ReauthorizeFunc",
    "RefreshFunc",
    "TokenRefresh",
    "TokenRefreshError",
]

RefreshFunc = Callable[[], Awaitable[str]]
"""``async () -> str``: obtain a new access token (the bare token, no ``Bearer``)."""

ReauthorizeFunc = Callable[[], Awaitable[object]]
"""``async () -> None``: drop stored refresh tokens and ask the user to authorise again."""

EXPIRED_DATA_CODE = "AccessTokenExpiredError"
"""The ``$dataCode`` of a 401 that a token refresh fixes."""

MAX_AUTH_BODY = 64 * 1024
"""A 401 body longer than this (bytes, by Content-Length) is not read: the 401 is returned as is."""

MAX_STALE_TOKENS = 1024
"""How many replaced ``Authorization`` values are remembered (oldest forgotten first)."""

_in_refresh: ContextVar[bool] = ContextVar("resilient_sage_in_refresh", default=False)
"""True inside ``refresh()``, so a token request made through the same session passes by."""


class TokenRefreshError(ResilienceError):
    """``refresh()`` failed (the cause is chained as ``__cause__``); nothing was re-sent."""


def _bearer(token: object) -> str:
    """``"Bearer <token>"``; a non-string, empty or whitespace-bearing token is refused.

    The message never contains the token.
    """
    if not isinstance(token, str):
        raise TypeError(f"refresh() must return the token as str, got {type(token).__name__}")
    if not token or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in token):
        raise ValueError("refresh() returned an empty access token or one containing whitespace")
    return f"Bearer {token}"


async def _data_codes(response: ClientResponse) -> list[str] | None:
    """``$dataCode`` values of a 401 body, or ``None`` when the body cannot be read.

    Reading caches the body in aiohttp, so the response stays readable for the caller.
    """
    length = response.content_length
    if length is not None and length > MAX_AUTH_BODY:
        return None
    try:
        body = await response.read()
    except aiohttp.ClientError:
        return None
    return [e.data_code for e in parse_errors(body)]


def _name(func: object) -> str:
    """A callable's qualified name (never its repr, which may hold a refresh token)."""
    return str(getattr(func, "__qualname__", type(func).__name__))


def _retrieve(task: asyncio.Future[str]) -> None:
    """Mark a refresh task's exception retrieved (every awaiter may have been cancelled)."""
    if not task.cancelled():
        task.exception()


class TokenRefresh(Policy):
    """On a 401 ``AccessTokenExpiredError``: ``await refresh()`` once, set the token, re-send once.

    - ``refresh``: ``async () -> str`` returning the new access token. Concurrent
      callers that hit the same expiry share one call (single flight, per token
      generation); a later expiry refreshes again. If it raises, the call raises
      :class:`TokenRefreshError` from it; nothing loops.
    - After a refresh, every request that still carries a replaced
      ``Authorization`` value (e.g. the session's default header) is sent with the
      new token instead, so callers do not each rediscover the expiry. The values a
      refresh replaces (those its callers sent) are marked in the step it completes.
    - One refresh per expiry: a request sent with an older token generation than the
      one in place when its 401 comes back is re-sent with the newer token, never
      refreshed again (``refresh()`` rotates the refresh token).
    - Any other 401: ``await on_reauthorize()`` (if given; it may run for several
      concurrent 401s, so make it idempotent) and the 401 is returned; nothing is
      retried. A 401 whose body cannot be read is returned as is.

    Order 0: :func:`resilient.chain` places it outermost. Tokens never appear in
    its repr, its log lines or its exceptions.
    """

    kind = "auth"
    order = 0

    __slots__ = (
        "_auth",
        "_generation",
        "_inflight",
        "_on_reauthorize",
        "_refresh",
        "_replacing",
        "_stale",
    )

    def __init__(
        self, refresh: RefreshFunc, *, on_reauthorize: ReauthorizeFunc | None = None
    ) -> None:
        if not callable(refresh):
            raise ValueError(
                f"TokenRefresh: refresh must be an async callable () -> str,"
                f" got {type(refresh).__name__}"
            )
        if on_reauthorize is not None and not callable(on_reauthorize):
            raise ValueError(
                f"TokenRefresh: on_reauthorize must be None or an async callable,"
                f" got {type(on_reauthorize).__name__}"
            )
        self._refresh = refresh
        self._on_reauthorize = on_reauthorize
        self._auth = ""  # "Bearer <latest token>", "" before the first refresh
        self._stale: dict[str, None] = {}  # replaced Authorization values, oldest first
        self._generation = 0  # successful refreshes so far
        self._inflight: asyncio.Future[str] | None = None
        self._replacing: dict[str, None] = {}  # values the refresh in flight replaces

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, by_host(request), request, handler)
        generation = self._generation  # of the newest token this request can carry
        if self._stale and request.headers.get(hdrs.AUTHORIZATION) in self._stale:
            request.headers[hdrs.AUTHORIZATION] = self._auth
        resp = await handler(request)
        if resp.status != 401:
            return resp
        if _in_refresh.get():  # refresh() itself calls through this session
            return resp
        codes = await _data_codes(resp)
        if codes is None:
            return resp
        if EXPIRED_DATA_CODE not in codes:
            await self._reauthorize(request, resp, codes)
            return resp
        resp.release()
        auth = await self._fresh_auth(generation, request)
        if getattr(request.body, "consumed", False):
            raise BodyNotReplayable("TokenRefresh: token refreshed but the body is consumed")
        request.headers[hdrs.AUTHORIZATION] = auth
        return await handler(request)

    async def _reauthorize(
        self, request: ClientRequest, resp: ClientResponse, codes: list[str]
    ) -> None:
        why = ",".join(codes)[:200] or "without $dataCode"
        logger.warning(
            "TokenRefresh: 401 %s from %s; the user must authorise again", why, resp.url.host
        )
        _events.emit("reauthorize", "auth", by_host(request), request, status=401, reason=why)
        if self._on_reauthorize is None:
            return
        try:
            await self._on_reauthorize()
        except BaseException:
            resp.release()
            raise

    async def _fresh_auth(self, generation: int, request: ClientRequest) -> str:
        """The ``Authorization`` value to re-send with: join the refresh in flight, reuse
        a token newer than ``generation`` (the request's), or start a refresh."""
        task = self._inflight
        if task is None:
            if self._generation != generation and self._auth:
                return self._auth  # refreshed after this request was sent
            self._replacing = {}
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._run_refresh(request, self._replacing), context=_metrics.fresh_context()
            )
            task.add_done_callback(_retrieve)
        sent = request.headers.get(hdrs.AUTHORIZATION)
        if sent is not None:  # replaced once the refresh succeeds, even if we are cancelled
            self._replacing[sent] = None
        try:
            return await asyncio.shield(task)
        except Exception as exc:
            raise TokenRefreshError(
                f"TokenRefresh: refresh() failed ({type(exc).__name__}); nothing was re-sent"
            ) from exc

    async def _run_refresh(self, request: ClientRequest, replacing: dict[str, None]) -> str:
        """Refresh once for every caller; ``request`` (the first to need it) names the event.

        In the step it completes, the token is in place and every value its callers
        sent (``replacing``) is stale: a request entering before they resume goes out
        with the new token instead of meeting the expiry again."""
        _in_refresh.set(True)  # this task's own context copy
        try:
            auth = _bearer(await self._refresh())
            for value in (self._auth, *replacing):
                if value and value != auth:
                    self._mark_stale(value)
            self._auth = auth
            self._generation += 1
            logger.info("TokenRefresh: access token refreshed (generation %d)", self._generation)
            _events.emit(
                "token_refreshed", "auth", by_host(request), request, status=401,
                reason=f"{EXPIRED_DATA_CODE} (generation {self._generation})",
            )  # fmt: skip
            return auth
        finally:
            self._inflight = None

    def _mark_stale(self, value: str) -> None:
        """Remember ``value`` as replaced (bounded by :data:`MAX_STALE_TOKENS`)."""
        stale = self._stale
        if value in stale:
            return
        if len(stale) >= MAX_STALE_TOKENS:
            del stale[next(iter(stale))]
        stale[value] = None

    @property
    def generation(self) -> int:
        """How many refreshes succeeded."""
        return self._generation

    def __repr__(self) -> str:
        reauth = "None" if self._on_reauthorize is None else _name(self._on_reauthorize)
        return (
            f"sage.TokenRefresh(refresh={_name(self._refresh)}, on_reauthorize={reauth},"
            f" generation={self._generation})"
        )
