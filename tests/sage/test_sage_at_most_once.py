"""At most once: a POST /sales_invoices the server may have processed is never sent again.

Against the simulated API's creation log (``api.invoices``): a POST processed
before the connection dropped, or whose reply timed out, reaches the server once
and the caller gets aiohttp's error; a POST refused with 429 or 503 was not
processed, so it is re-sent and the invoice is created exactly once.
"""

from __future__ import annotations

import aiohttp
import pytest

from resilient import sage
from resilient.testing import SimulatedAPI

INVOICE = {"sales_invoice": {"contact_id": "c-1", "date": "2024-05-01", "total_amount": "120.00"}}
PATH = "/sales_invoices"


def open_session(api: SimulatedAPI, **kwargs: object) -> aiohttp.ClientSession:
    return sage.session(base_url=api.url + "/", headers={"X-Business": "biz-1"}, **kwargs)


@pytest.mark.looptime
async def test_post_processed_before_the_connection_dropped_is_not_resent():
    async with SimulatedAPI() as api, open_session(api) as s:
        api.inject(PATH, "drop_after")
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.post("sales_invoices", json=INVOICE)
    assert len(api.invoices) == 1
    assert api.count(PATH, "POST") == 1


@pytest.mark.looptime
async def test_post_whose_reply_timed_out_is_not_resent():
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=1.0)
    async with SimulatedAPI() as api, open_session(api, timeout=timeout) as s:
        api.inject(PATH, "slow_after", delay=30.0)
        with pytest.raises(aiohttp.ServerTimeoutError):
            await s.post("sales_invoices", json=INVOICE)
    assert len(api.invoices) == 1
    assert api.count(PATH, "POST") == 1


@pytest.mark.looptime
@pytest.mark.parametrize("refusal", ["429", "503"])
async def test_post_refused_unprocessed_is_resent_and_created_once(refusal):
    async with SimulatedAPI() as api, open_session(api) as s:
        api.inject(PATH, refusal)
        async with s.post("sales_invoices", json=INVOICE) as resp:
            assert resp.status == 201
    assert len(api.invoices) == 1
    assert api.count(PATH, "POST") == 2


@pytest.mark.looptime
async def test_post_answered_500_is_returned_not_resent():
    async with SimulatedAPI() as api, open_session(api) as s:
        api.inject(PATH, "500")
        async with s.post("sales_invoices", json=INVOICE) as resp:
            assert resp.status == 500
    assert api.count(PATH, "POST") == 1
