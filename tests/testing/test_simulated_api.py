"""SimulatedAPI: the Sage-like server behaves as configured, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest

from resilient.testing import DROPPED, LogEntry, SimulatedAPI

INVOICE = {"sales_invoice": {"contact_id": "7", "date": "2024-05-01", "reference": "order-1"}}
B1 = {"X-Business": "b1"}
B2 = {"X-Business": "b2"}


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON body) of one GET."""
    async with session.get(url, **kwargs) as resp:
        return resp.status, resp.headers, await resp.json()


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with session.post(url, **kwargs) as resp:
        return resp.status, resp.headers, await resp.json()


def codes(body: Any) -> list[tuple[str, str]]:
    """[(dataCode, source)] of a Sage error body; fails unless it is a well-formed list."""
    assert isinstance(body, list)
    for item in body:
        assert set(item) == {"$severity", "$dataCode", "$message", "$source"}
        assert item["$severity"] == "error"
    return [(item["$dataCode"], item["$source"]) for item in body]


# --- quota ------------------------------------------------------------------------------


async def test_quota_answers_429_after_the_limit_for_that_business_only(client):
    async with SimulatedAPI(quota=(3, 60.0)) as api:
        statuses = [(await get(client, api.url + "/contacts/1", headers=B1))[0] for _ in range(4)]
        other, _, _ = await get(client, api.url + "/contacts/1", headers=B2)
    assert statuses == [200, 200, 200, 429]
    assert other == 200


async def test_requests_without_business_header_share_the_default_quota(client):
    async with SimulatedAPI(quota=(2, 60.0)) as api:
        statuses = [(await get(client, api.url + "/contacts/1"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


@pytest.mark.looptime
async def test_429_retry_after_seconds_is_the_time_until_the_window_frees(client):
    async with SimulatedAPI(quota=(2, 60.0), retry_after="seconds") as api:
        await get(client, api.url + "/contacts/1", headers=B1)
        await asyncio.sleep(10.0)
        await get(client, api.url + "/contacts/1", headers=B1)
        status, headers, body = await get(client, api.url + "/contacts/1", headers=B1)
    assert status == 429
    assert headers["Retry-After"] == "50"
    assert codes(body) == [("TooManyRequests", "")]


@pytest.mark.looptime
async def test_quota_recovers_once_the_window_has_moved_on(client):
    async with SimulatedAPI(quota=(2, 60.0)) as api:
        for _ in range(2):
            await get(client, api.url + "/contacts/1", headers=B1)
        status, headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
        await asyncio.sleep(float(headers["Retry-After"]))
        after, _, _ = await get(client, api.url + "/contacts/1", headers=B1)
    assert (status, after) == (429, 200)


@pytest.mark.looptime
async def test_refused_requests_do_not_extend_the_window(client):
    async with SimulatedAPI(quota=(1, 60.0)) as api:
        await get(client, api.url + "/contacts/1", headers=B1)
        for _ in range(5):
            await asyncio.sleep(10.0)
            await get(client, api.url + "/contacts/1", headers=B1)  # 429s, not counted
        await asyncio.sleep(10.0)
        status, _, _ = await get(client, api.url + "/contacts/1", headers=B1)
    assert status == 200
    assert api.count(status=429) == 5


async def test_429_retry_after_date_is_an_http_date_when_the_window_frees(client):
    async with SimulatedAPI(quota=(1, 60.0), retry_after="date") as api:
        await get(client, api.url + "/contacts/1", headers=B1)
        status, headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
    until = parsedate_to_datetime(headers["Retry-After"]).timestamp() - time.time()
    assert status == 429
    assert 59.0 <= until <= 62.0


async def test_429_without_retry_after_when_configured_none(client):
    async with SimulatedAPI(quota=(1, 60.0), retry_after="none") as api:
        await get(client, api.url + "/contacts/1", headers=B1)
        status, headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
    assert status == 429
    assert "Retry-After" not in headers


@pytest.mark.looptime
async def test_block_for_refuses_the_business_for_24_hours_of_virtual_time(client):
    async with SimulatedAPI(quota=(1, 60.0), block_for=86_400.0) as api:
        await get(client, api.url + "/contacts/1", headers=B1)
        first, headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
        await asyncio.sleep(86_399.0)
        late, late_headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
        await asyncio.sleep(1.0)
        after, _, _ = await get(client, api.url + "/contacts/1", headers=B1)
    assert (first, headers["Retry-After"]) == (429, "86400")
    assert (late, late_headers["Retry-After"]) == (429, "1")
    assert after == 200


async def test_token_endpoint_is_outside_the_quota(client):
    async with SimulatedAPI(quota=(1, 60.0)) as api:
        _, refresh = api.issue_tokens()
        data = {"grant_type": "refresh_token", "refresh_token": refresh}
        token_status, _, _ = await post(client, api.url + "/token", data=data)
        status, _, _ = await get(client, api.url + "/contacts/1")
    assert (token_status, status) == (200, 200)


# --- 503, outages, 500 ------------------------------------------------------------------


async def statuses_with_error_rate(client: aiohttp.ClientSession, seed: int) -> list[int]:
    async with SimulatedAPI(quota=None, error_rate=0.3, seed=seed) as api:
        return [(await get(client, api.url + "/contacts/1"))[0] for _ in range(200)]


async def test_seeded_error_rate_is_reproducible(client):
    first = await statuses_with_error_rate(client, seed=7)
    second = await statuses_with_error_rate(client, seed=7)
    assert first == second
    assert set(first) == {200, 503}


async def test_error_rate_answers_roughly_that_share_of_503s(client):
    statuses = await statuses_with_error_rate(client, seed=3)
    assert 0.2 <= statuses.count(503) / len(statuses) <= 0.4


async def test_random_503_is_a_sage_error_without_retry_after(client):
    async with SimulatedAPI(error_rate=1.0) as api:
        status, headers, body = await get(client, api.url + "/contacts/1")
    assert status == 503
    assert "Retry-After" not in headers
    assert codes(body) == [("ServiceUnavailable", "")]


@pytest.mark.looptime
async def test_outage_window_answers_503_to_every_request(client):
    async with SimulatedAPI(outages=[(10.0, 20.0)]) as api:
        await asyncio.sleep(5.0)
        before, _, _ = await get(client, api.url + "/contacts/1")
        await asyncio.sleep(10.0)
        during, _, _ = await get(client, api.url + "/contacts/1")
        token, _, _ = await post(client, api.url + "/token", data={})
        await asyncio.sleep(10.0)
        after, _, _ = await get(client, api.url + "/contacts/1")
    assert (before, during, token, after) == (200, 503, 503, 200)


async def test_fail_paths_answer_500_without_processing(client):
    async with SimulatedAPI(fail_paths={"/sales_invoices"}) as api:
        status, _, body = await post(client, api.url + "/sales_invoices", json=INVOICE)
        other, _, _ = await get(client, api.url + "/contacts/1")
    assert (status, other) == (500, 200)
    assert codes(body) == [("InternalServerError", "")]
    assert api.invoices == []


# --- auth -------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_auth_refuses_a_request_without_token_with_authorization_failure(client):
    async with SimulatedAPI(auth=True) as api:
        status, _, body = await get(client, api.url + "/contacts/1")
    assert status == 401
    assert codes(body) == [("AuthorizationFailure", "Authorization")]


async def test_auth_accepts_an_issued_access_token(client):
    async with SimulatedAPI(auth=True) as api:
        access, _ = api.issue_tokens()
        status, _, _ = await get(client, api.url + "/contacts/1", headers=bearer(access))
    assert status == 200


@pytest.mark.looptime
async def test_access_token_expires_after_its_ttl(client):
    async with SimulatedAPI(auth=True, access_token_ttl=300.0) as api:
        access, _ = api.issue_tokens()
        await asyncio.sleep(299.0)
        fresh, _, _ = await get(client, api.url + "/contacts/1", headers=bearer(access))
        await asyncio.sleep(1.0)
        status, _, body = await get(client, api.url + "/contacts/1", headers=bearer(access))
    assert (fresh, status) == (200, 401)
    assert body == [
        {
            "$severity": "error",
            "$dataCode": "AccessTokenExpiredError",
            "$message": "Your Access token has expired.",
            "$source": "Authorization",
        }
    ]


async def test_expire_access_tokens_expires_every_current_token(client):
    async with SimulatedAPI(auth=True) as api:
        access, _ = api.issue_tokens()
        api.expire_access_tokens()
        status, _, body = await get(client, api.url + "/contacts/1", headers=bearer(access))
    assert status == 401
    assert codes(body) == [("AccessTokenExpiredError", "Authorization")]


async def test_refresh_issues_a_working_access_token_and_a_new_refresh_token(client):
    async with SimulatedAPI(auth=True) as api:
        _, refresh = api.issue_tokens()
        api.expire_access_tokens()
        data = {"grant_type": "refresh_token", "refresh_token": refresh}
        status, _, grant = await post(client, api.url + "/token", data=data)
        after, _, _ = await get(
            client, api.url + "/contacts/1", headers=bearer(grant["access_token"])
        )
    assert status == 200
    assert grant["token_type"] == "bearer"
    assert grant["expires_in"] == 300
    assert grant["refresh_token"] != refresh
    assert after == 200


async def test_refresh_accepts_a_json_body(client):
    async with SimulatedAPI(auth=True) as api:
        _, refresh = api.issue_tokens()
        payload = {"grant_type": "refresh_token", "refresh_token": refresh}
        status, _, grant = await post(client, api.url + "/token", json=payload)
    assert status == 200
    assert grant["access_token"]


async def test_a_used_refresh_token_is_refused_with_invalid_grant(client):
    async with SimulatedAPI(auth=True) as api:
        _, refresh = api.issue_tokens()
        data = {"grant_type": "refresh_token", "refresh_token": refresh}
        first, _, _ = await post(client, api.url + "/token", data=data)
        again, _, body = await post(client, api.url + "/token", data=data)
    assert (first, again) == (200, 400)
    assert body["error"] == "invalid_grant"


async def test_a_revoked_access_token_answers_authorization_failure(client):
    async with SimulatedAPI(auth=True) as api:
        access, _ = api.issue_tokens()
        api.revoke(access)
        status, _, body = await get(client, api.url + "/contacts/1", headers=bearer(access))
    assert status == 401
    assert codes(body) == [("AuthorizationFailure", "Authorization")]


async def test_a_revoked_refresh_token_answers_authorization_failure(client):
    async with SimulatedAPI(auth=True) as api:
        _, refresh = api.issue_tokens()
        api.revoke(refresh)
        data = {"grant_type": "refresh_token", "refresh_token": refresh}
        status, _, body = await post(client, api.url + "/token", data=data)
    assert status == 401
    assert codes(body)[0][0] == "AuthorizationFailure"


async def test_requests_refused_by_auth_do_not_count_against_the_quota(client):
    async with SimulatedAPI(auth=True, quota=(1, 60.0)) as api:
        access, _ = api.issue_tokens()
        await get(client, api.url + "/contacts/1")  # 401
        status, _, _ = await get(client, api.url + "/contacts/1", headers=bearer(access))
    assert status == 200


# --- endpoint errors --------------------------------------------------------------------


async def test_post_with_a_body_that_is_not_json_answers_415(client):
    async with SimulatedAPI() as api:
        status, _, body = await post(client, api.url + "/sales_invoices", data={"a": "b"})
    assert status == 415
    assert codes(body)[0][0] == "UnsupportedMediaType"
    assert api.invoices == []


@pytest.mark.parametrize("field", ["contact_id", "date"])
async def test_invoice_missing_a_field_answers_422_record_invalid_naming_it(client, field):
    fields = {k: v for k, v in INVOICE["sales_invoice"].items() if k != field}
    async with SimulatedAPI() as api:
        status, _, body = await post(
            client, api.url + "/sales_invoices", json={"sales_invoice": fields}
        )
    assert status == 422
    assert codes(body) == [("RecordInvalid", field)]


async def test_wrong_verb_answers_405_method_not_allowed(client):
    async with SimulatedAPI() as api, client.delete(api.url + "/contacts") as resp:
        status, allow, body = resp.status, resp.headers["Allow"], await resp.json()
    assert (status, allow) == (405, "GET")
    assert codes(body) == [("MethodNotAllowed", "Gateway")]


async def test_unknown_path_answers_404_path_not_found(client):
    async with SimulatedAPI() as api:
        status, _, body = await get(client, api.url + "/nowhere")
    assert status == 404
    assert codes(body) == [("PathNotFound", "Gateway")]


async def test_unknown_contact_answers_404_record_not_found(client):
    async with SimulatedAPI(contacts=3) as api:
        status, _, body = await get(client, api.url + "/contacts/4")
    assert status == 404
    assert codes(body) == [("RecordNotFound", "id")]


# --- endpoints --------------------------------------------------------------------------


async def test_pagination_walks_every_contact_through_next(client):
    async with SimulatedAPI(contacts=45) as api:
        ids: list[str] = []
        path: str | None = "/contacts?items_per_page=10"
        pages = 0
        while path is not None:
            status, _, page = await get(client, api.url + path)
            assert status == 200
            assert page["$total"] == 45
            ids += [item["id"] for item in page["$items"]]
            path = page["$next"]
            pages += 1
    assert pages == 5
    assert ids == [str(i) for i in range(1, 46)]


async def test_page_links_back_to_the_previous_page(client):
    async with SimulatedAPI() as api:
        _, _, page = await get(client, api.url + "/contacts?page=2&items_per_page=5")
    assert page["$back"] == "/contacts?page=1&items_per_page=5"
    assert page["$page"] == 2
    assert page["$itemsPerPage"] == 5
    assert page["$items"][0]["$path"] == "/contacts/6"


async def test_default_page_size_is_20(client):
    async with SimulatedAPI() as api:
        _, _, page = await get(client, api.url + "/contacts")
    assert (len(page["$items"]), page["$back"]) == (20, None)


@pytest.mark.parametrize(
    ("query", "source"),
    [
        ("items_per_page=201", "items_per_page"),
        ("items_per_page=x", "items_per_page"),
        ("items_per_page=0", "items_per_page"),
        ("page=0", "page"),
    ],
)
async def test_invalid_paging_answers_422(client, query, source):
    async with SimulatedAPI() as api:
        status, _, body = await get(client, api.url + "/contacts?" + query)
    assert status == 422
    assert codes(body) == [("RecordInvalid", source)]


async def test_post_sales_invoice_creates_and_records_it(client):
    async with SimulatedAPI() as api:
        status, _, invoice = await post(client, api.url + "/sales_invoices", json=INVOICE)
        _, _, shown = await get(client, api.url + invoice["$path"])
    assert status == 201
    assert api.invoices == [invoice]
    assert invoice["reference"] == "order-1"
    assert shown == invoice


# --- injected faults --------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "500", "429"])
async def test_injected_status_answers_the_next_requests_then_stops(client, fault):
    async with SimulatedAPI() as api:
        api.inject("/sales_invoices", fault, count=2)
        statuses = [
            (await post(client, api.url + "/sales_invoices", json=INVOICE))[0] for _ in range(3)
        ]
    assert statuses == [int(fault), int(fault), 201]
    assert len(api.invoices) == 1


async def test_injected_429_says_retry_after_delay(client):
    async with SimulatedAPI() as api:
        api.inject("/contacts/1", "429", delay=120.0)
        status, headers, _ = await get(client, api.url + "/contacts/1")
    assert (status, headers["Retry-After"]) == (429, "120")


async def test_injected_fault_matches_the_exact_path_only(client):
    async with SimulatedAPI() as api:
        api.inject("/contacts", "503")
        other, _, _ = await get(client, api.url + "/contacts/1")
        status, _, _ = await get(client, api.url + "/contacts?page=2")
    assert (other, status) == (200, 503)


async def test_drop_before_closes_the_connection_without_creating(client):
    async with SimulatedAPI() as api:
        api.inject("/sales_invoices", "drop_before")
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(client, api.url + "/sales_invoices", json=INVOICE)
    assert api.invoices == []
    assert api.log[-1].status == DROPPED


async def test_drop_after_creates_the_invoice_then_drops_the_connection(client):
    async with SimulatedAPI() as api:
        api.inject("/sales_invoices", "drop_after")
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(client, api.url + "/sales_invoices", json=INVOICE)
    assert len(api.invoices) == 1
    assert api.count("/sales_invoices", "POST") == 1


@pytest.mark.looptime
async def test_slow_after_creates_the_invoice_and_the_client_read_times_out(client):
    async with SimulatedAPI() as api:
        api.inject("/sales_invoices", "slow_after", delay=30.0)
        timeout = aiohttp.ClientTimeout(sock_read=1.0)
        with pytest.raises(asyncio.TimeoutError):
            await post(client, api.url + "/sales_invoices", json=INVOICE, timeout=timeout)
    assert len(api.invoices) == 1
    assert api.count("/sales_invoices", status=201) == 1


def test_inject_rejects_an_unknown_fault():
    with pytest.raises(ValueError, match="fault must be one of"):
        SimulatedAPI().inject("/contacts", "teapot")


# --- log, latency, lifecycle ------------------------------------------------------------


@pytest.mark.looptime
async def test_log_records_time_method_path_business_and_status(client):
    async with SimulatedAPI(quota=(1, 60.0)) as api:
        t0 = asyncio.get_running_loop().time()
        await get(client, api.url + "/contacts?page=1", headers=B1)
        await asyncio.sleep(5.0)
        await post(client, api.url + "/sales_invoices", json=INVOICE)
        await get(client, api.url + "/contacts/2", headers=B1)
    assert [(e.method, e.path, e.business, e.status) for e in api.log] == [
        ("GET", "/contacts", "b1", 200),
        ("POST", "/sales_invoices", None, 201),
        ("GET", "/contacts/2", "b1", 429),
    ]
    assert isinstance(api.log[0], LogEntry)
    assert api.log[1].time - t0 == pytest.approx(5.0, abs=0.01)


@pytest.mark.looptime
async def test_latency_delays_every_reply_on_the_loop_clock(client):
    async with SimulatedAPI(latency=2.0) as api:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await get(client, api.url + "/contacts/1")
        elapsed = loop.time() - t0
    assert elapsed == pytest.approx(2.0, abs=0.01)


async def test_start_returns_the_loopback_url():
    api = SimulatedAPI()
    try:
        url = await api.start()
        assert url == api.url
        assert url.startswith("http://127.0.0.1:")
    finally:
        await api.close()
    await api.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quota": (0, 60.0)}, "quota"),
        ({"quota": (10, 0.0)}, "quota"),
        ({"retry_after": "never"}, "retry_after"),
        ({"block_for": 0.0}, "block_for"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"outages": [(5.0, 5.0)]}, "outages"),
        ({"latency": -1.0}, "latency"),
        ({"access_token_ttl": 0.0}, "access_token_ttl"),
        ({"contacts": -1}, "contacts"),
    ],
)
def test_invalid_configuration_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedAPI(**kwargs)


# --- pytest fixtures --------------------------------------------------------------------


async def test_simulated_api_fixture_is_started_with_defaults(simulated_api, client):
    status, _, page = await get(client, simulated_api.url + "/contacts")
    assert status == 200
    assert page["$total"] == 450


async def test_simulated_api_factory_starts_configured_apis(simulated_api_factory, client):
    api = await simulated_api_factory(quota=(1, 60.0), contacts=5)
    await get(client, api.url + "/contacts")
    status, _, _ = await get(client, api.url + "/contacts")
    assert status == 429


@pytest.mark.looptime
async def test_simulated_api_fixture_runs_on_virtual_time(simulated_api, client):
    url = simulated_api.url + "/contacts/1"
    for _ in range(200):
        await get(client, url, headers=B1)
    status, headers, _ = await get(client, url, headers=B1)
    await asyncio.sleep(60.0)
    after, _, _ = await get(client, url, headers=B1)
    assert (status, headers["Retry-After"], after) == (429, "60", 200)


# --- limiters the client is not told ----------------------------------------------------


async def statuses(client: aiohttp.ClientSession, url: str, n: int, **kwargs: Any) -> list[int]:
    """Statuses of ``n`` GETs sent one after another."""
    return [(await get(client, url, **kwargs))[0] for _ in range(n)]


@pytest.mark.looptime
async def test_leaky_bucket_admits_burst_plus_one_at_once_then_answers_429(client):
    async with SimulatedAPI(limiter=("leaky", 50.0, 5)) as api:
        got = await statuses(client, api.url + "/contacts/1", 7, headers=B1)
        _, headers, body = await get(client, api.url + "/contacts/1", headers=B1)
    assert got == [200] * 6 + [429]
    assert headers["Retry-After"] == "1"
    assert codes(body) == [("TooManyRequests", "")]


@pytest.mark.looptime
async def test_leaky_bucket_admits_one_more_request_each_one_over_rate_seconds(client):
    async with SimulatedAPI(limiter=("leaky", 2.0, 0)) as api:
        url = api.url + "/contacts/1"
        first = await statuses(client, url, 2, headers=B1)
        await asyncio.sleep(0.5)
        second = await statuses(client, url, 2, headers=B1)
        await asyncio.sleep(0.4)
        early = await statuses(client, url, 1, headers=B1)
    assert (first, second, early) == ([200, 429], [200, 429], [429])


@pytest.mark.looptime
async def test_leaky_bucket_retry_after_is_the_time_until_one_slot_frees(client):
    async with SimulatedAPI(limiter=("leaky", 0.1, 1)) as api:
        url = api.url + "/contacts/1"
        await statuses(client, url, 2, headers=B1)
        await asyncio.sleep(3.0)
        status, headers, _ = await get(client, url, headers=B1)
        await asyncio.sleep(float(headers["Retry-After"]))
        after, _, _ = await get(client, url, headers=B1)
    assert (status, headers["Retry-After"], after) == (429, "7", 200)


@pytest.mark.looptime
async def test_leaky_bucket_refused_requests_do_not_fill_it(client):
    async with SimulatedAPI(limiter=("leaky", 1.0, 0)) as api:
        url = api.url + "/contacts/1"
        await get(client, url, headers=B1)
        refused = await statuses(client, url, 20, headers=B1)
        await asyncio.sleep(1.0)
        status, _, _ = await get(client, url, headers=B1)
    assert set(refused) == {429}
    assert status == 200


@pytest.mark.looptime
async def test_leaky_bucket_is_per_business(client):
    async with SimulatedAPI(limiter=("leaky", 1.0, 0)) as api:
        url = api.url + "/contacts/1"
        mine = await statuses(client, url, 2, headers=B1)
        other = await statuses(client, url, 1, headers=B2)
    assert (mine, other) == ([200, 429], [200])


@pytest.mark.looptime
async def test_fixed_window_admits_limit_per_window_aligned_on_start(client):
    async with SimulatedAPI(limiter=("fixed", 3, 10.0)) as api:
        url = api.url + "/contacts/1"
        await asyncio.sleep(4.0)
        first = await statuses(client, url, 4, headers=B1)
        _, headers, _ = await get(client, url, headers=B1)
        await asyncio.sleep(6.0)  # the next window starts 10 s after start()
        second = await statuses(client, url, 4, headers=B1)
    assert first == second == [200, 200, 200, 429]
    assert headers["Retry-After"] == "6"


@pytest.mark.looptime
async def test_fixed_window_refused_requests_do_not_count(client):
    async with SimulatedAPI(limiter=("fixed", 1, 10.0)) as api:
        url = api.url + "/contacts/1"
        await get(client, url, headers=B1)
        refused = await statuses(client, url, 5, headers=B1)
        await asyncio.sleep(10.0)
        after = await statuses(client, url, 2, headers=B1)
    assert refused == [429] * 5
    assert after == [200, 429]


@pytest.mark.looptime
async def test_moving_limiter_is_the_quota(client):
    async with SimulatedAPI(quota=None, limiter=("moving", 2, 60.0)) as api:
        url = api.url + "/contacts/1"
        await get(client, url, headers=B1)
        await asyncio.sleep(10.0)
        got = await statuses(client, url, 2, headers=B1)
        _, headers, _ = await get(client, url, headers=B1)
    assert got == [200, 429]
    assert headers["Retry-After"] == "50"


@pytest.mark.looptime
async def test_limiter_with_block_for_blocks_the_business(client):
    async with SimulatedAPI(limiter=("leaky", 10.0, 0), block_for=60.0) as api:
        url = api.url + "/contacts/1"
        got = await statuses(client, url, 2, headers=B1)
        await asyncio.sleep(30.0)
        _, headers, _ = await get(client, url, headers=B1)
    assert got == [200, 429]
    assert headers["Retry-After"] == "30"


# --- advertised limits -------------------------------------------------------------------


async def test_no_rate_limit_headers_unless_advertised(client):
    async with SimulatedAPI(limiter=("fixed", 1, 10.0)) as api:
        _, ok, _ = await get(client, api.url + "/contacts/1")
        _, refused, _ = await get(client, api.url + "/contacts/1")
    assert not [h for h in (*ok, *refused) if "ratelimit" in h.lower()]


@pytest.mark.looptime
async def test_advertise_ietf_sends_the_policy_and_the_fixed_window_state(client):
    async with SimulatedAPI(limiter=("fixed", 3, 10.0), advertise="ietf") as api:
        url = api.url + "/contacts/1"
        await asyncio.sleep(2.5)
        seen = [(await get(client, url, headers=B1))[:2] for _ in range(4)]
    assert [status for status, _ in seen] == [200, 200, 200, 429]
    assert {h["RateLimit-Policy"] for _, h in seen} == {'"default";q=3;w=10'}
    assert [h["RateLimit"] for _, h in seen] == [
        '"default";r=2;t=8',
        '"default";r=1;t=8',
        '"default";r=0;t=8',
        '"default";r=0;t=8',
    ]


async def test_advertise_true_is_the_ietf_dialect(client):
    async with SimulatedAPI(quota=(5, 60.0), advertise=True) as api:
        _, headers, _ = await get(client, api.url + "/contacts/1", headers=B1)
    assert headers["RateLimit-Policy"] == '"default";q=5;w=60'
    assert headers["RateLimit"] == '"default";r=4;t=60'


@pytest.mark.looptime
async def test_advertise_x_sends_the_moving_window_state_with_reset_in_seconds(client):
    async with SimulatedAPI(quota=(2, 60.0), advertise="x") as api:
        url = api.url + "/contacts/1"
        _, first, _ = await get(client, url, headers=B1)
        await asyncio.sleep(15.0)
        _, second, _ = await get(client, url, headers=B1)
        status, refused, _ = await get(client, url, headers=B1)
    state = [
        (h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"], h["X-RateLimit-Reset"])
        for h in (first, second, refused)
    ]
    assert status == 429
    assert state == [("2", "1", "60"), ("2", "0", "45"), ("2", "0", "45")]
    assert refused["Retry-After"] == "45"


@pytest.mark.looptime
async def test_advertise_legacy_sends_the_leaky_bucket_level_and_drain_time(client):
    async with SimulatedAPI(limiter=("leaky", 2.0, 3), advertise="legacy") as api:
        url = api.url + "/contacts/1"
        seen = [(await get(client, url, headers=B1))[1] for _ in range(5)]
        await asyncio.sleep(1.0)
        _, later, _ = await get(client, url, headers=B1)
    state = [
        (h["RateLimit-Limit"], h["RateLimit-Remaining"], h["RateLimit-Reset"])
        for h in (*seen, later)
    ]
    # capacity 4; level 1..4 after each admission, drained 2/s; after 1 s: 2 + 1
    assert state == [
        ("4", "3", "1"),
        ("4", "2", "1"),
        ("4", "1", "2"),
        ("4", "0", "2"),
        ("4", "0", "2"),
        ("4", "1", "2"),
    ]


@pytest.mark.looptime
async def test_advertised_state_counts_down_to_zero_while_blocked(client):
    async with SimulatedAPI(quota=(1, 10.0), block_for=100.0, advertise="x") as api:
        url = api.url + "/contacts/1"
        await statuses(client, url, 2, headers=B1)
        await asyncio.sleep(40.0)
        _, headers, _ = await get(client, url, headers=B1)
    assert (headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset"]) == ("0", "60")


async def test_advertised_headers_are_on_every_limited_path_but_not_token(client):
    async with SimulatedAPI(quota=(5, 60.0), advertise="x") as api:
        _, missing, _ = await get(client, api.url + "/nowhere", headers=B1)
        _, token, _ = await post(client, api.url + "/token", data={"grant_type": "refresh_token"})
    assert missing["X-RateLimit-Remaining"] == "4"
    assert "X-RateLimit-Limit" not in token


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quota": (10, 60.0), "limiter": ("leaky", 5.0, 1)}, "limiter replaces quota"),
        ({"limiter": ("token", 5.0, 1)}, "limiter must be"),
        ({"limiter": ("leaky", 0.0, 1)}, "leaky rate"),
        ({"limiter": ("leaky", 5.0, -1)}, "leaky burst"),
        ({"limiter": ("leaky", 5.0, 1.5)}, "leaky burst"),
        ({"limiter": ("fixed", 0, 10.0)}, "fixed limit"),
        ({"limiter": ("fixed", 10, math.inf)}, "fixed window"),
        ({"limiter": ("moving", 10, 0.0)}, "moving window"),
        ({"advertise": "draft"}, "advertise must be"),
        ({"quota": None, "advertise": True}, "advertise needs"),
    ],
)
def test_invalid_limiter_or_advertise_raises_value_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedAPI(**kwargs)


def test_limiter_replaces_the_default_quota():
    SimulatedAPI(limiter=("fixed", 10, 1.0))
    SimulatedAPI(quota=None, limiter=("fixed", 10, 1.0))


async def test_leaky_bucket_answers_like_nginx_limit_req_on_the_same_schedule(client):
    """The same requests, on the real clock, to nginx's ``limit_req`` (1 r/s, burst 3,
    nodelay) and to ``limiter=("leaky", 1.0, 3)``: the same statuses."""
    from nginx_server import new_nginx_server

    from resilient.testing import limit_req_config

    async def schedule(url: str) -> list[int]:
        first = [await status_of(url) for _ in range(6)]
        await asyncio.sleep(1.1)  # 1.1 slots drain: one more fits, not two
        return first + [await status_of(url) for _ in range(2)]

    async def status_of(url: str) -> int:
        async with client.get(url) as resp:
            await resp.read()
            return resp.status

    with new_nginx_server(limit_req_config(1.0, 3)) as nginx:
        real = await schedule(nginx.url + "/")
    async with SimulatedAPI(limiter=("leaky", 1.0, 3)) as api:
        simulated = await schedule(api.url + "/contacts/1")
    assert real == simulated == [200] * 4 + [429] * 2 + [200, 429]
