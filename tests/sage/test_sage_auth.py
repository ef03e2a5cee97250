"""sage.TokenRefresh against a real loopback server that checks bearer tokens."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import sage
from resilient.sage._auth import MAX_AUTH_BODY


def expired_401() -> web.Response:
    return web.json_response(
        [
            {
                "$severity": "error",
                "$dataCode": "AccessTokenExpiredError",
                "$message": "Your Access token has expired.",
                "$source": "Authorization",
            }
        ],
        status=401,
    )


def failure_401() -> web.Response:
    return web.json_response(
        {
            "$severity": "error",
            "$dataCode": "AuthorizationFailure",
            "$message": "The token was revoked.",
            "$source": "Authorization",
        },
        status=401,
    )


class Tokens:
    """The server's view: one valid access token; ``refresh()`` issues the next one."""

    def __init__(self) -> None:
        self.valid = "access-0"
        self.refreshes = 0
        self.gate: asyncio.Event | None = None  # refresh() waits on it when set

    async def refresh(self) -> str:
        self.refreshes += 1
        if self.gate is not None:
            await self.gate.wait()
        self.valid = f"access-{self.refreshes}"
        return self.valid

    def expire(self) -> None:
        self.valid = "nothing-is-valid-until-refresh"

    async def reply(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == f"Bearer {self.valid}":
            return web.json_response({"ok": True})
        return expired_401()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sent_tokens(server, path: str = "/r") -> list[str]:
    return [a.headers.get("Authorization", "") for a in server.arrivals if a.path == path]


async def test_expired_token_is_refreshed_and_the_request_resent_with_it(server):
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    async with (
        aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s,
        s.get(server.url + "/r", headers=bearer("access-0")) as resp,
    ):
        assert resp.status == 200
    assert tokens.refreshes == 1
    assert sent_tokens(server) == ["Bearer access-0", "Bearer access-1"]


async def test_concurrent_callers_hitting_one_expiry_share_one_refresh(server):
    tokens = Tokens()
    tokens.expire()
    tokens.gate = asyncio.Event()
    server.default("/r", tokens.reply)
    callers = 5

    async def call(s: aiohttp.ClientSession) -> int:
        async with s.get(server.url + "/r", headers=bearer("access-0")) as resp:
            return resp.status

    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s:
        tasks = [asyncio.create_task(call(s)) for _ in range(callers)]
        while server.count("/r") < callers:  # every caller has met the expired token
            await asyncio.sleep(0)
        tokens.gate.set()
        assert await asyncio.gather(*tasks) == [200] * callers
    assert tokens.refreshes == 1
    assert server.count("/r") == 2 * callers


async def test_a_later_expiry_refreshes_again(server):
    tokens = Tokens()
    server.default("/r", tokens.reply)
    policy = sage.TokenRefresh(tokens.refresh)
    async with aiohttp.ClientSession(middlewares=(policy,), headers=bearer("access-0")) as s:
        for _ in range(2):
            tokens.expire()
            async with s.get(server.url + "/r") as resp:
                assert resp.status == 200
    assert tokens.refreshes == 2
    assert policy.generation == 2


async def test_requests_carrying_the_replaced_token_go_out_with_the_new_one(server):
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    async with aiohttp.ClientSession(
        middlewares=(sage.TokenRefresh(tokens.refresh),), headers=bearer("access-0")
    ) as s:
        for _ in range(3):
            async with s.get(server.url + "/r") as resp:
                assert resp.status == 200
    assert sent_tokens(server) == ["Bearer access-0"] + ["Bearer access-1"] * 3


async def test_other_tokens_are_not_replaced(server):
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    async with (
        aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s,
        s.get(server.url + "/r", headers=bearer("access-0")) as resp,
    ):
        assert resp.status == 200
        async with s.get(server.url + "/other", headers=bearer("someone-else")):
            pass
    assert sent_tokens(server, "/other") == ["Bearer someone-else"]


async def test_other_401_awaits_on_reauthorize_and_returns_the_readable_401(server):
    tokens = Tokens()
    reauthorized: list[bool] = []

    async def on_reauthorize() -> None:
        reauthorized.append(True)

    async def revoked(request: web.Request) -> web.Response:
        return failure_401()

    server.default("/r", revoked)
    policy = sage.TokenRefresh(tokens.refresh, on_reauthorize=on_reauthorize)
    async with (
        aiohttp.ClientSession(middlewares=(policy,)) as s,
        s.get(server.url + "/r", headers=bearer("access-0")) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["$dataCode"] == "AuthorizationFailure"
    assert reauthorized == [True]
    assert tokens.refreshes == 0
    assert server.count("/r") == 1


async def test_other_401_without_on_reauthorize_is_returned_unretried(server):
    tokens = Tokens()
    server.script("/r", 401)  # plain-text body: not an expiry
    async with (
        aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s,
        s.get(server.url + "/r") as resp,
    ):
        assert resp.status == 401
    assert tokens.refreshes == 0
    assert server.count("/r") == 1


async def test_401_with_an_oversized_body_is_returned_without_reauthorizing(server):
    calls: list[bool] = []

    async def on_reauthorize() -> None:
        calls.append(True)

    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=401, body=b"x" * (MAX_AUTH_BODY + 1))

    server.script("/r", huge)
    policy = sage.TokenRefresh(Tokens().refresh, on_reauthorize=on_reauthorize)
    async with (
        aiohttp.ClientSession(middlewares=(policy,)) as s,
        s.get(server.url + "/r") as resp,
    ):
        assert resp.status == 401
        assert len(await resp.read()) == MAX_AUTH_BODY + 1
    assert calls == []


async def test_failing_refresh_raises_token_refresh_error_chaining_the_cause(server):
    async def refresh() -> str:
        raise RuntimeError("token endpoint down")

    server.default("/r", Tokens().reply)
    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(refresh),)) as s:
        with pytest.raises(sage.TokenRefreshError) as caught:
            await s.get(server.url + "/r", headers=bearer("old"))
    assert isinstance(caught.value, resilient.ResilienceError)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert server.count("/r") == 1


async def test_refresh_returning_a_non_string_raises_token_refresh_error(server):
    async def refresh() -> str:
        return None  # type: ignore[return-value]

    server.default("/r", Tokens().reply)
    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(refresh),)) as s:
        with pytest.raises(sage.TokenRefreshError):
            await s.get(server.url + "/r", headers=bearer("old"))
    assert server.count("/r") == 1


async def test_a_failed_refresh_is_tried_again_by_the_next_expiry(server):
    tokens = Tokens()
    outcomes = iter([RuntimeError("down"), None])

    async def refresh() -> str:
        error = next(outcomes)
        if error is not None:
            raise error
        return await tokens.refresh()

    tokens.expire()
    server.default("/r", tokens.reply)
    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(refresh),)) as s:
        with pytest.raises(sage.TokenRefreshError):
            await s.get(server.url + "/r", headers=bearer("old"))
        async with s.get(server.url + "/r", headers=bearer("old")) as resp:
            assert resp.status == 200


async def test_a_second_expiry_after_the_resend_is_returned_not_looped(server):
    calls: list[bool] = []

    async def refresh() -> str:
        calls.append(True)
        return "also-expired"

    async def always_expired(request: web.Request) -> web.Response:
        return expired_401()

    server.default("/r", always_expired)
    async with (
        aiohttp.ClientSession(middlewares=(sage.TokenRefresh(refresh),)) as s,
        s.get(server.url + "/r", headers=bearer("old")) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())[0]["$dataCode"] == "AccessTokenExpiredError"
    assert calls == [True]
    assert server.count("/r") == 2


async def test_the_401_is_released_before_the_resend(server):
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    connector = aiohttp.TCPConnector(limit=1)
    policy = sage.TokenRefresh(tokens.refresh)
    async with aiohttp.ClientSession(connector=connector, middlewares=(policy,)) as s:
        async with asyncio.timeout(5):  # a held connection would block the resend forever
            async with s.get(server.url + "/r", headers=bearer("old")) as resp:
                assert resp.status == 200


async def test_post_body_is_resent_after_a_refresh(server):
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    async with (
        aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s,
        s.post(server.url + "/r", json={"n": 1}, headers=bearer("old")) as resp,
    ):
        assert resp.status == 200
    assert [a.body for a in server.arrivals] == [b'{"n": 1}', b'{"n": 1}']


async def test_request_made_by_refresh_through_the_same_session_passes_by(server):
    session_box: list[aiohttp.ClientSession] = []

    async def refresh() -> str:
        async with session_box[0].post(server.url + "/token") as resp:
            if resp.status != 200:
                raise RuntimeError(f"token endpoint answered {resp.status}")
            return "fresh"

    async def expired(request: web.Request) -> web.Response:
        return expired_401()

    server.default("/r", expired)
    server.default("/token", expired)
    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(refresh),)) as s:
        session_box.append(s)
        async with asyncio.timeout(5):  # a refresh waiting on itself would hang
            with pytest.raises(sage.TokenRefreshError):
                await s.get(server.url + "/r", headers=bearer("old"))
    assert server.count("/token") == 1


def test_chain_places_token_refresh_outermost():
    policy = sage.TokenRefresh(Tokens().refresh)
    (pipeline,) = resilient.chain(resilient.Retry(), resilient.Throttle(1.0), policy)
    assert pipeline.policies[0] is policy  # type: ignore[attr-defined]


@pytest.mark.parametrize("refresh", ["a-token-string", None, 42])
def test_refresh_must_be_callable(refresh):
    with pytest.raises(ValueError, match="refresh must be an async callable") as caught:
        sage.TokenRefresh(refresh)
    assert "a-token-string" not in str(caught.value)


def test_on_reauthorize_must_be_callable():
    with pytest.raises(ValueError, match="on_reauthorize"):
        sage.TokenRefresh(Tokens().refresh, on_reauthorize="drop")  # type: ignore[arg-type]


async def test_a_cancelled_caller_does_not_cancel_the_shared_refresh(server):
    tokens = Tokens()
    tokens.expire()
    tokens.gate = asyncio.Event()
    server.default("/r", tokens.reply)

    async def call(s: aiohttp.ClientSession) -> int:
        async with s.get(server.url + "/r", headers=bearer("access-0")) as resp:
            return resp.status

    async with aiohttp.ClientSession(middlewares=(sage.TokenRefresh(tokens.refresh),)) as s:
        first, second = asyncio.create_task(call(s)), asyncio.create_task(call(s))
        while tokens.refreshes < 1 or server.count("/r") < 2:
            await asyncio.sleep(0)
        first.cancel()
        tokens.gate.set()
        assert await second == 200
        with pytest.raises(asyncio.CancelledError):
            await first
    assert tokens.refreshes == 1


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_a_request_entering_as_the_refresh_completes_does_not_refresh_again(server):
    """The request enters the chain in the very loop tick where ``refresh()`` completes
    (before the first caller resumes), still carrying the replaced token: its 401 must
    be re-sent with the new token, not rotate the refresh token a second time."""
    tokens = Tokens()
    tokens.expire()
    server.default("/r", tokens.reply)
    server.default("/late", tokens.reply)
    completes = asyncio.Event()

    async def refresh() -> str:
        token = await tokens.refresh()
        completes.set()  # wakes the late request in the same tick as the refresh's end
        return token

    async def hold(request: aiohttp.ClientRequest, handler):  # a user's outer middleware
        if request.url.path == "/late":
            await completes.wait()
        return await handler(request)

    policy = sage.TokenRefresh(refresh)
    async with aiohttp.ClientSession(middlewares=(hold, policy), headers=bearer("access-0")) as s:

        async def call(path: str) -> int:
            async with s.get(server.url + path) as resp:
                return resp.status

        late = asyncio.create_task(call("/late"))  # parked in ``hold``
        statuses = await asyncio.gather(call("/r"), late)
    assert tokens.refreshes == 1
    assert statuses == [200, 200]
    assert policy.generation == 1
    assert sent_tokens(server, "/r") == ["Bearer access-0", "Bearer access-1"]
    assert sent_tokens(server, "/late")[-1] == "Bearer access-1"
