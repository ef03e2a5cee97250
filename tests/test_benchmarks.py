"""Each benchmark scenario runs once in its smallest form and measures what it says.

These check the benchmarks' mechanics (every client measured, counts consistent with what
the server saw), not speed: no assertion here reads a timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import __main__ as cli
from benchmarks._harness import Config, Progress, ScenarioResult, percentile
from benchmarks._report import fmt, text_report
from benchmarks.scenarios import SCENARIOS, day, flaky, outage, quota, scale, shared, storm

TINY = Config(tiny=True)
CLIENTS = {"aiohttp", "resilient", "aiohttp-retry", "tenacity", "naive"}


def run(name: str) -> ScenarioResult:
    result: ScenarioResult = SCENARIOS[name].run(TINY, Progress(1.0, enabled=False))
    assert result.error is None
    return result


def rows_by_client(result: ScenarioResult) -> dict[str, dict[str, object]]:
    return {str(row.get("client", row.get("variant"))): row for row in result.rows}


@pytest.mark.timeout(60)
def test_overhead_measures_every_client_at_both_concurrencies_without_failures() -> None:
    rows = rows_by_client(run("overhead"))
    assert set(rows) >= CLIENTS
    for row in rows.values():
        assert row["failed"] == 0
        assert row["CPU µs/req c=1"] > 0  # type: ignore[operator]
        assert row["CPU µs/req c=50"] > 0  # type: ignore[operator]
    assert rows["aiohttp"]["CPU ×aiohttp c=50"] == 1.0


def test_inprocess_measures_each_policy_and_an_open_breaker() -> None:
    rows = rows_by_client(run("inprocess"))
    assert {"bare handler", "Retry + CircuitBreaker", "full chain"} <= set(rows)
    assert rows["bare handler"]["policy cost µs"] is None
    assert rows["fail-fast (chain, open)"]["µs/call"] > 0  # type: ignore[operator]


def test_quota_counts_the_429s_the_server_sent_to_raw_aiohttp() -> None:
    result = run("quota")
    rows = rows_by_client(result)
    n = quota._count(TINY)
    assert set(rows) == CLIENTS
    assert rows["aiohttp"]["ok"] == quota.QUOTA
    assert rows["aiohttp"]["429s received"] == n - quota.QUOTA
    assert all(r["ok"] + r["failed"] == n for r in rows.values())  # type: ignore[operator]


def test_storm_counts_every_raw_request_after_the_first_as_during_the_block() -> None:
    rows = rows_by_client(run("storm"))
    callers, _ = storm._sizes(TINY)
    assert rows["aiohttp"]["requests during block"] == callers - 1
    assert rows["aiohttp"]["ok %"] == 0.0
    assert rows["aiohttp"]["requests / caller"] == 1.0


def test_storm_block_stats_count_probes_up_to_the_first_success() -> None:
    log = [(0.0, 200), (1.0, 429), (2.0, 429), (11.0, 429), (11.5, 200), (11.6, 200)]
    assert storm._block_stats(log, 10.0) == {"during": 1, "probes": 2, "start": 1.0}


def test_flaky_amplification_of_a_client_without_retries_is_one() -> None:
    rows = rows_by_client(run("flaky"))
    assert rows["aiohttp"]["amplification"] == 1.0
    assert 50.0 < rows["aiohttp"]["ok %"] < 90.0  # type: ignore[operator]
    assert {flaky.NO_BUDGET, *CLIENTS} == set(rows)


def test_outage_raw_client_sends_exactly_its_calls_during_the_outage() -> None:
    rows = rows_by_client(run("outage"))
    raw = rows["aiohttp"]
    assert raw["server req during outage"] == raw["calls during outage"]
    assert raw["calls during outage"] == int(outage.OUTAGE * outage._rate(TINY))
    assert outage.COLD in rows


def test_day_runs_a_day_long_block_on_virtual_time() -> None:
    rows = rows_by_client(run("day"))
    assert rows["resilient"]["virtual h"] >= 24.0  # type: ignore[operator]
    assert rows["aiohttp"]["requests sent"] == day._callers(TINY)


def test_scale_baseline_parks_every_caller_without_sending() -> None:
    rows = run("scale").rows
    assert rows[0]["sent while parked"] == 0
    assert rows[0]["ok"] == scale._callers(TINY)
    assert rows[0]["KiB / waiter"] > 0


@pytest.mark.timeout(60)
def test_shared_counts_two_scripts_per_request_and_no_429_on_the_shared_quota() -> None:
    from redis_server import new_redis_server

    new_redis_server()  # skip without redis-server (fail under CI=true), as the Redis tests
    rows = rows_by_client(run("shared"))
    total = shared.PROCESSES * shared._per_process(TINY)
    alone = rows[f"{shared.PROCESSES} processes, memory:// (a quota each)"]
    together = rows[f"{shared.PROCESSES} processes, one Redis quota"]
    assert rows["Throttle(quotas), Redis: caller's path"]["Redis scripts/req"] == 2.0
    assert alone["ok"] == together["ok"] == total
    assert alone["429s received"] >= total - shared.QUOTA  # each process spent the quota
    assert together["429s received"] == 0
    assert together["max in any 1 s"] <= shared.QUOTA


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([1.0, 2.0], 0.99) == 2.0


def test_fmt_shows_missing_values_as_a_dash() -> None:
    assert fmt(None) == "–"
    assert fmt(float("nan")) == "–"
    assert fmt(1234.5) == "1,234"


def test_text_report_says_miss_for_a_missed_target() -> None:
    from benchmarks._harness import Target

    result = ScenarioResult("x", "X", "", ["client"], [{"client": "a"}],
                            targets=[Target("t", "≤ 1", "2", False)])
    assert "MISS" in text_report([result], {"cpus": 2, "python": "3", "aiohttp": "3"})


def test_cli_writes_report_json_and_a_plot(tmp_path: Path) -> None:
    assert cli.main(["--quick", "--only", "storm", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in data["scenarios"]] == ["storm"]
    assert data["machine"]["cpus"] >= 1
    assert "PASS" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "storm.png").stat().st_size > 0
