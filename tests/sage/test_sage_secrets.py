"""No access token, refresh token or Authorization value is ever written out.

Runs a token refresh, a reauthorisation, typed errors, a failed refresh and
retries with distinctive tokens, capturing every logger at DEBUG, then searches
log records, exception str/repr and policy reprs for them.
"""

from __future__ import annotations

import functools
import logging

import aiohttp
import pytest
from aiohttp import web

from resilient import sage

ACCESS_OLD = "acc-OLD-5f2e9b1d0a"
ACCESS_NEW = "acc-NEW-7c4a0e3f11"
REFRESH_1 = "ref-ONE-91d3c6a2"
REFRESH_2 = "ref-TWO-4b8e05f7"
SECRETS = (ACCESS_OLD, ACCESS_NEW, REFRESH_1, REFRESH_2)


def sage_error(status: int, code: str, message: str) -> web.Response:
    body = [{"$severity": "error", "$dataCode": code, "$message": message, "$source": "x"}]
    return web.json_response(body, status=status)


class FakeSage:
    """Checks bearer tokens; rotates refresh tokens; echoes tokens in error messages."""

    def __init__(self) -> None:
        self.refresh_token = REFRESH_1
        self.contacts_503 = 1

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("refresh_token") != self.refresh_token:
            return sage_error(400, "invalid_grant", f"unknown {form.get('refresh_token')}")
        self.refresh_token = REFRESH_2
        return web.json_response({"access_token": ACCESS_NEW, "refresh_token": REFRESH_2})

    async def contacts(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {ACCESS_NEW}":
            return sage_error(401, "AccessTokenExpiredError", f"{auth} has expired")
        if self.contacts_503:
            self.contacts_503 -= 1
            return sage_error(503, "ServiceUnavailable", f"try later, {auth}")
        return web.json_response({"$items": [], "$next": None})

    async def revoked(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        return sage_error(401, "AuthorizationFailure", f"token {auth} was revoked")

    async def invoices(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        return sage_error(422, "RecordInvalid", f"contact missing (sent with {auth})")


async def refresh_with(url: str, store: dict[str, str]) -> str:
    """A user's refresh(): posts the stored refresh token, keeps the rotated one."""
    async with (
        aiohttp.ClientSession() as plain,
        plain.post(
            url, data={"grant_type": "refresh_token", "refresh_token": store["refresh"]}
        ) as resp,
    ):
        tokens = await resp.json()
    store["refresh"] = tokens["refresh_token"]
    return str(tokens["access_token"])


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) + repr(r.args) for r in records]


@pytest.mark.looptime
async def test_no_token_in_logs_exceptions_or_reprs(server, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeSage()
    server.default("/token", fake.token)
    server.default("/contacts", fake.contacts)
    server.default("/revoked", fake.revoked)
    server.default("/sales_invoices", fake.invoices)
    store = {"refresh": REFRESH_1}
    reauthorized: list[bool] = []

    async def on_reauthorize() -> None:
        store.clear()
        reauthorized.append(True)

    refresh = functools.partial(refresh_with, server.url + "/token", store)
    texts: list[str] = []
    policies = sage.policies(refresh=refresh, on_reauthorize=on_reauthorize)
    texts += [repr(p) for p in policies]
    headers = {"Authorization": f"Bearer {ACCESS_OLD}", "X-Business": "biz-1"}
    async with sage.session(policies=policies, base_url=server.url + "/", headers=headers) as s:
        async with s.get("contacts") as resp:  # expired -> refresh -> 503 -> retry -> 200
            assert resp.status == 200
        async with s.get("revoked") as resp:
            with pytest.raises(sage.AuthorizationError) as revoked:
                await sage.raise_for_error(resp)
        async with s.post("sales_invoices", json={"sales_invoice": {}}) as resp:
            with pytest.raises(sage.ValidationError) as invalid:
                await sage.raise_for_error(resp)
    texts += [repr(p) for p in policies]
    for caught in (revoked, invalid):
        error = caught.value
        texts += [str(error), repr(error), repr(error.args), repr(error.errors)]
        texts += [repr(error.request_info), str(error.message)]
    texts += record_texts(caplog.records)

    assert reauthorized == [True]
    assert store == {}
    assert server.count("/token") == 1
    assert server.count("/contacts") == 3  # old token, 503, 200
    logged = " ".join(record_texts(caplog.records))
    assert "refreshed" in logged
    assert "must authorise again" in logged
    assert [t for t in texts if leaks(t)] == []


async def test_failed_refresh_error_and_its_log_hold_no_token(server, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeSage()
    fake.refresh_token = "a-token-the-client-does-not-have"
    server.default("/token", fake.token)
    server.default("/contacts", fake.contacts)
    store = {"refresh": REFRESH_1}
    policy = sage.TokenRefresh(functools.partial(refresh_with, server.url + "/token", store))
    headers = {"Authorization": f"Bearer {ACCESS_OLD}"}
    async with aiohttp.ClientSession(middlewares=(policy,), headers=headers) as s:
        with pytest.raises(sage.TokenRefreshError) as caught:
            await s.get(server.url + "/contacts")
    texts = [str(caught.value), repr(caught.value), repr(policy), *record_texts(caplog.records)]
    assert [t for t in texts if leaks(t)] == []
