"""sage.by_business, sage.policies() and sage.session(): Sage's defaults and overrides."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import resilient
from resilient import sage
from resilient.testing import SimulatedAPI


def key_recorder(keys: list[str]):
    async def middleware(request, handler):
        keys.append(sage.by_business(request))
        return await handler(request)

    return middleware


async def test_by_business_keys_on_host_and_x_business(server):
    keys: list[str] = []
    async with aiohttp.ClientSession(middlewares=(key_recorder(keys),)) as s:
        for business in ("biz-a", "biz-b"):
            async with s.get(server.url + "/r", headers={"X-Business": business}):
                pass
    assert keys == [f"{server.url} business=biz-a", f"{server.url} business=biz-b"]


async def test_by_business_without_the_header_is_the_host_key(server):
    keys: list[str] = []
    async with (
        aiohttp.ClientSession(middlewares=(key_recorder(keys),)) as s,
        s.get(server.url + "/r"),
    ):
        pass
    assert keys == [server.url]


def kinds(policies) -> list[str]:
    return [p.kind for p in policies]


async def noop_refresh() -> str:
    return "token"


def test_policies_without_refresh_are_retry_breaker_backoff_throttle_in_chain_order():
    assert kinds(sage.policies()) == ["retry", "circuit_breaker", "rate_limit_backoff", "throttle"]


def test_policies_with_refresh_put_token_refresh_outermost():
    built = sage.policies(refresh=noop_refresh)
    assert isinstance(built[0], sage.TokenRefresh)
    assert kinds(built)[1:] == ["retry", "circuit_breaker", "rate_limit_backoff", "throttle"]


def of_kind(policies, kind: str):
    (policy,) = [p for p in policies if p.kind == kind]
    return policy


def test_policies_wait_up_to_a_day_for_429s_per_business():
    backoff = of_kind(sage.policies(), "rate_limit_backoff")
    assert backoff.max_wait == 86_400.0
    assert "by_business" in repr(backoff)


def test_policies_override_dict_updates_only_the_given_arguments():
    backoff = of_kind(sage.policies(rate_limit_backoff={"max_wait": 60.0}), "rate_limit_backoff")
    assert backoff.max_wait == 60.0
    assert "by_business" in repr(backoff)


def test_policies_throttle_each_business_at_the_published_limit():
    throttle = of_kind(sage.policies(), "throttle")
    assert throttle.rate == pytest.approx(200 / 60)
    assert throttle.burst == sage.DEFAULT_BURST
    assert "quotas='200 per 60 seconds'" in repr(throttle)
    assert "key=by_business" in repr(throttle)
    assert "adaptive=True" in repr(throttle)


def test_policies_throttle_rate_override_keeps_the_quota_and_key():
    throttle = of_kind(sage.policies(throttle={"rate": 1.0}), "throttle")
    assert throttle.rate == 1.0
    assert "quotas='200 per 60 seconds'" in repr(throttle)
    assert "key=by_business" in repr(throttle)


def test_policies_override_none_leaves_a_policy_out():
    assert "throttle" not in kinds(sage.policies(throttle=None))


def test_policies_override_instance_is_used_as_is():
    retry = resilient.Retry(attempts=2)
    assert retry in sage.policies(retry=retry)


def test_policies_override_instance_of_another_kind_is_rejected():
    with pytest.raises(ValueError, match="throttle="):
        sage.policies(throttle=resilient.Retry())


def test_policies_override_of_an_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown override breaker; accepted: circuit_breaker"):
        sage.policies(breaker={"open_for": 5.0})


def test_policies_override_of_another_type_is_rejected():
    with pytest.raises(ValueError, match="retry= must be a Retry"):
        sage.policies(retry=3)


def test_on_reauthorize_without_refresh_is_rejected():
    async def on_reauthorize() -> None:
        return None

    with pytest.raises(ValueError, match="on_reauthorize needs refresh"):
        sage.policies(on_reauthorize=on_reauthorize)


def test_published_limit_gives_the_default_rate_and_quota():
    assert pytest.approx(200 / 60) == sage.DEFAULT_RATE
    assert sage.DEFAULT_QUOTAS == "200 per 60 seconds"
    assert sage.DEFAULT_MAX_WAIT == 86_400.0


async def test_session_sends_json_headers_and_the_callers_headers(server):
    async with (
        sage.session(base_url=None, headers={"X-Business": "biz-1"}) as s,
        s.get(server.url + "/contacts"),
    ):
        pass
    sent = server.arrivals[0].headers
    assert sent["Accept"] == "application/json"
    assert sent["Content-Type"] == "application/json"
    assert sent["X-Business"] == "biz-1"


async def test_session_callers_headers_win_over_the_defaults(server):
    async with (
        sage.session(base_url=None, headers={"accept": "text/csv"}) as s,
        s.get(server.url + "/contacts"),
    ):
        pass
    assert server.arrivals[0].headers["Accept"] == "text/csv"


async def test_session_joins_relative_paths_to_base_url(server):
    async with (
        sage.session(base_url=server.url + "/v3.1/") as s,
        s.get("contacts", params={"page": 2}) as resp,
    ):
        assert resp.status == 200
    assert server.arrivals[0].path == "/v3.1/contacts"


class Captured(Exception):
    """Raised by a middleware that records the URL instead of sending."""


async def capture_url(request, handler):
    raise Captured(str(request.url))


async def test_session_default_base_url_is_the_accounting_api():
    async with sage.session() as s:
        with pytest.raises(Captured) as caught:
            await s.get("contacts", middlewares=(capture_url,))
    assert str(caught.value) == "https://api.accounting.sage.com/v3.1/contacts"


async def test_session_has_no_total_timeout_so_a_long_429_wait_can_happen():
    async with sage.session() as s:
        assert s.timeout.total is None
        assert s.timeout.sock_read is not None


async def test_session_rejects_policies_together_with_refresh():
    with pytest.raises(ValueError, match="not together with policies="):
        sage.session(policies=sage.policies(), refresh=noop_refresh)


# --- against the simulated API ---------------------------------------------------------


def refresher(api: SimulatedAPI, refresh_token: str):
    stored = {"refresh_token": refresh_token}
    calls: list[bool] = []

    async def refresh() -> str:
        calls.append(True)
        form = {"grant_type": "refresh_token", "refresh_token": stored["refresh_token"]}
        async with (
            aiohttp.ClientSession() as plain,
            plain.post(api.url + "/token", data=form) as resp,
        ):
            tokens = await resp.json()
        stored["refresh_token"] = tokens["refresh_token"]
        return str(tokens["access_token"])

    return refresh, calls


@pytest.mark.looptime
async def test_session_refreshes_an_expired_token_once_and_lists_contacts():
    async with SimulatedAPI(auth=True) as api:
        access, refresh_token = api.issue_tokens()
        api.expire_access_tokens()
        refresh, calls = refresher(api, refresh_token)
        headers = {"Authorization": f"Bearer {access}", "X-Business": "biz-1"}
        async with sage.session(refresh=refresh, base_url=api.url + "/", headers=headers) as s:
            for page in (1, 2):
                async with s.get("contacts", params={"page": page}) as resp:
                    await sage.raise_for_error(resp)
                    assert (await resp.json())["$items"]
    assert calls == [True]
    assert api.count("/contacts", status=401) == 1
    assert api.count("/contacts", status=200) == 2


@pytest.mark.looptime
async def test_session_calls_on_reauthorize_for_a_revoked_token():
    reauthorized: list[bool] = []

    async def on_reauthorize() -> None:
        reauthorized.append(True)

    async with SimulatedAPI(auth=True) as api:
        access, refresh_token = api.issue_tokens()
        api.revoke(access)
        refresh, calls = refresher(api, refresh_token)
        headers = {"Authorization": f"Bearer {access}"}
        async with (
            sage.session(
                refresh=refresh,
                on_reauthorize=on_reauthorize,
                base_url=api.url + "/",
                headers=headers,
            ) as s,
            s.get("contacts") as resp,
        ):
            with pytest.raises(sage.AuthorizationError) as caught:
                await sage.raise_for_error(resp)
    assert caught.value.data_codes == ["AuthorizationFailure"]
    assert reauthorized == [True]
    assert calls == []


@pytest.mark.looptime
async def test_session_waits_out_a_429_for_the_business_and_succeeds():
    async with SimulatedAPI(quota=(1, 60.0)) as api:
        headers = {"X-Business": "biz-1"}
        async with sage.session(base_url=api.url + "/", headers=headers) as s:
            for _ in range(2):
                async with s.get("contacts") as resp:
                    assert resp.status == 200
    assert api.count("/contacts", status=429) == 1
    assert api.log[-1].time - api.log[0].time >= 60.0


@pytest.mark.looptime
async def test_a_paused_business_does_not_delay_another_business():
    async with SimulatedAPI(quota=(1, 60.0)) as api, sage.session(base_url=api.url + "/") as s:

        async def get(business: str) -> float:
            async with s.get("contacts", headers={"X-Business": business}) as resp:
                assert resp.status == 200
            return asyncio.get_running_loop().time()

        started = asyncio.get_running_loop().time()
        await get("biz-a")
        paused = asyncio.create_task(get("biz-a"))  # 429: biz-a pauses about 60 s
        while api.count(status=429) < 1:
            await asyncio.sleep(0.01)
        other_done = await get("biz-b")
        paused_done = await paused
    assert other_done - started < 1.0
    assert paused_done - started >= 60.0


@pytest.mark.looptime
@pytest.mark.timeout(30)
async def test_each_business_learns_its_own_rate_and_the_throttle_reads_it():
    """A server that accepts 1 call/s per business (below Sage's published 200/60): the
    business that earns 429s is paced at a learned rate, capped by the Throttle's 200/60,
    which the Throttle reports; the other business is not paced at all."""
    policies = sage.policies()
    backoff = next(p for p in policies if isinstance(p, resilient.RateLimitBackoff))
    throttle = next(p for p in policies if isinstance(p, resilient.Throttle))
    async with SimulatedAPI(quota=None, limiter=("leaky", 1.0, 1)) as api:
        key_a, key_b = f"{api.url} business=biz-a", f"{api.url} business=biz-b"
        async with resilient.session(*policies, base_url=api.url + "/") as s:

            async def get(business: str) -> None:
                async with s.get("contacts", headers={"X-Business": business}) as resp:
                    assert resp.status == 200

            await asyncio.gather(*(get("biz-a") for _ in range(12)))
            await get("biz-b")
            learned = backoff.rate(key_a)
            assert learned is not None
            assert learned <= 200 / 60
            assert throttle.current_rate(key_a) == pytest.approx(learned)
            assert backoff.rate(key_b) is None
            assert throttle.current_rate(key_b) == pytest.approx(200 / 60)
    assert api.count("/contacts", status=429) >= 1
