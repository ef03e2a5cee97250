"""List Sage Accounting contacts page by page through ``sage.session()``.

    .venv/bin/python examples/sage_contacts.py
        against resilient.testing.SimulatedAPI, started in-process; its access token
        starts out expired, so the first call shows TokenRefresh at work.

    SAGE_ACCESS_TOKEN=... [SAGE_BUSINESS_ID=...] .venv/bin/python examples/sage_contacts.py
        against the real API (https://api.accounting.sage.com/v3.1/).

Prints one progress line per page. Waits of a second or more (a 429, a retry) are
logged by the ``resilient`` logger at INFO with the time they end.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import aiohttp

from resilient import sage
from resilient.testing import SimulatedAPI

PAGE_SIZE = 100
"""Contacts per page (``items_per_page``; Sage allows up to 200)."""


async def list_contacts(session: aiohttp.ClientSession) -> int:
    """Fetch every page of ``contacts``; print a line per page; return the count."""
    page, seen = 1, 0
    while True:
        params = {"page": page, "items_per_page": PAGE_SIZE}
        async with session.get("contacts", params=params) as resp:
            await sage.raise_for_error(resp)  # typed errors: sage.ValidationError, ...
            body: dict[str, Any] = await resp.json()
        items = body.get("$items") or []
        seen += len(items)
        total = body.get("$total", "?")
        print(f"page {page}: {len(items)} contacts ({seen} of {total})", flush=True)
        if not body.get("$next") or not items:
            return seen
        page += 1


async def against_real_api(access_token: str, business: str | None) -> int:
    headers = {"Authorization": f"Bearer {access_token}"}
    if business:
        headers["X-Business"] = business
    async with sage.session(headers=headers) as session:
        return await list_contacts(session)


async def against_simulated_api() -> int:
    async with SimulatedAPI(auth=True, contacts=450) as api:
        access, refresh_token = api.issue_tokens()
        api.expire_access_tokens()  # so the first call meets AccessTokenExpiredError
        stored = {"refresh_token": refresh_token}

        async def refresh() -> str:
            """Exchange the stored refresh token (Sage rotates it on every use)."""
            form = {"grant_type": "refresh_token", "refresh_token": stored["refresh_token"]}
            async with (
                aiohttp.ClientSession() as plain,
                plain.post(api.url + "/token", data=form) as resp,
            ):
                resp.raise_for_status()
                tokens = await resp.json()
            stored["refresh_token"] = tokens["refresh_token"]
            return str(tokens["access_token"])

        async def on_reauthorize() -> None:
            stored.clear()  # Sage: drop stored refresh tokens, ask the user to authorise
            print("authorisation lost: the user must sign in again", flush=True)

        headers = {"Authorization": f"Bearer {access}", "X-Business": "demo-business"}
        async with sage.session(
            refresh=refresh,
            on_reauthorize=on_reauthorize,
            base_url=api.url + "/",
            headers=headers,
        ) as session:
            return await list_contacts(session)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    access_token = os.environ.get("SAGE_ACCESS_TOKEN")
    if access_token:
        count = await against_real_api(access_token, os.environ.get("SAGE_BUSINESS_ID"))
    else:
        count = await against_simulated_api()
    print(f"{count} contacts in total")


if __name__ == "__main__":
    asyncio.run(main())
