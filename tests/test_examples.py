"""The examples run (on virtual time, so in milliseconds) and print what they promise."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.looptime
async def test_the_crawler_skips_the_dead_host_and_fetches_every_page_of_the_others(capsys):
    await load("crawler").main(4, 20)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 4
    dead, flaky, *healthy = rows
    assert dead[1] == "(down)"
    fetched, skipped, failed, requests = map(int, dead[2:])
    assert fetched == 0
    assert skipped > failed  # the shared circuit refused most pages without sending
    assert requests < 20
    assert flaky[1] == "(flaky)"
    assert int(flaky[2]) == 20
    for row in healthy:
        assert list(map(int, row[1:])) == [20, 0, 0, 20]


@pytest.mark.looptime
async def test_the_aiohttp_retry_migration_compares_both_clients(capsys):
    await load("migrate_aiohttp_retry").main()
    out = capsys.readouterr().out
    invoices = re.findall(r"(aiohttp-retry|resilient)\s+(\d) invoice", out)
    assert invoices == [("aiohttp-retry", "2"), ("resilient", "1")]
    bug = re.findall(r"(aiohttp-retry|resilient)\s+20/20 answered 500, (\d+) server", out)
    assert bug == [("aiohttp-retry", "80"), ("resilient", "20")]


@pytest.mark.looptime
async def test_the_sage_example_lists_every_contact_of_the_simulated_api(capsys, monkeypatch):
    monkeypatch.delenv("SAGE_ACCESS_TOKEN", raising=False)
    assert await load("sage_contacts").against_simulated_api() == 450
    assert "page 5: 50 contacts (450 of 450)" in capsys.readouterr().out
