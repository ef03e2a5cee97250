"""Each benchmark scenario runs once in its smallest form and measures what it says.

These check the benchmarks' mechanics (every client measured, counts consistent with what
the server saw), not speed: no assertion here reads a timing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from required import missing

from benchmarks import __main__ as cli
from benchmarks._harness import Config, Progress, ScenarioResult, percentile
from benchmarks._report import fmt, text_report
from benchmarks.scenarios import (
    SCENARIOS,
    advertised,
    day,
    flaky,
    outage,
    overload,
    quota,
    scale,
    shared,
    storm,
    tail,
    unknown,
)

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


@pytest.fixture(scope="module")
def unknown_result() -> ScenarioResult:
    return run("unknown")


def test_unknown_measures_every_client_against_both_limits(
    unknown_result: ScenarioResult,
) -> None:
    limits = unknown._limits(TINY)
    rows = unknown_result.rows
    assert len(rows) == unknown.units(TINY) == 12
    for limit in limits:
        mine = {r["client"]: r for r in rows if r["server"] == limit.label}
        assert set(mine) == {spec.label for spec in unknown._specs(limit)}
        assert all(r["server req / call"] >= 1.0 for r in mine.values())  # type: ignore[operator]
    assert [t.verdict for t in unknown_result.targets].count("n/a") == 0
    assert len(unknown_result.targets) == 3 * len(limits)


def test_unknown_raw_aiohttp_gets_what_the_limit_admits_at_once_and_429_for_the_rest(
    unknown_result: ScenarioResult,
) -> None:
    bucket, window = unknown._limits(TINY)
    raw = {r["server"]: r for r in unknown_result.rows if r["client"] == unknown.RAW}
    burst, limit = int(bucket.limiter[2]) + 1, int(window.limiter[1])
    assert raw[bucket.label]["calls done"] == f"{burst}/{bucket.calls}"
    assert raw[window.label]["calls done"] == f"{limit}/{window.calls}"
    assert raw[bucket.label]["429 % of calls"] == 100.0 * (bucket.calls - burst) / bucket.calls
    assert raw[window.label]["server req / call"] == 1.0


def test_unknown_plots_the_sending_rate_of_the_chain_and_a_baseline(
    unknown_result: ScenarioResult, tmp_path: Path
) -> None:
    from benchmarks._plots import write_plots

    for run_series in unknown_result.series["runs"].values():
        assert list(run_series["arrivals"]) == [unknown.DEFAULT, unknown.BASELINE]
    assert write_plots(tmp_path, [unknown_result]) == {"unknown": "unknown.png"}
    assert (tmp_path / "unknown.png").stat().st_size > 0


def test_unknown_ideal_is_the_fastest_schedule_the_limiter_allows() -> None:
    bucket = unknown.Limit("b", ("leaky", 50.0, 5), 50.0, calls=106)
    window = unknown.Limit("w", ("fixed", 100, 10.0), 10.0, calls=250)
    assert bucket.ideal == 2.0  # 6 at once, then 100 at 50/s
    assert window.ideal == 20.0  # 100 at 0 s, 10 s and 20 s
    assert window.ideal_for(100) == 0.0
    assert window.cutoff == 75.0


def test_unknown_cuts_off_a_client_that_does_not_finish_in_virtual_time() -> None:
    from benchmarks._clients import HEADERS, Client
    from benchmarks._harness import run_virtual

    class Stuck(Client):
        async def request(self, method: str, url: str, headers: dict[str, str] = HEADERS) -> int:
            await asyncio.sleep(1e6)
            return 200

    limit = unknown.Limit("b", ("leaky", 10.0, 0), 10.0, calls=20)
    result = run_virtual(unknown.closed_loop(Stuck, limit, wall_limit=20.0, callers=5))
    assert (result.cut, result.started, result.outcomes) == ("6 s", 5, [])
    assert result.elapsed == pytest.approx(6.0)


def test_advertised_raw_aiohttp_is_refused_beyond_the_advertised_window() -> None:
    result = run("advertised")
    for limit in advertised._limits(TINY):
        rows = {r["client"]: r for r in result.rows if r["server"] == limit.label}
        assert set(rows) == {spec.label for spec in advertised.SPECS}
        assert rows[unknown.RAW]["calls done"] == f"{int(limit.limiter[1])}/{limit.calls}"
    assert len(result.targets) == 6
    goals = {t.goal for t in result.targets}
    assert "0 × 429" in goals


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([1.0, 2.0], 0.99) == 2.0


def test_fmt_shows_missing_values_as_a_dash() -> None:
    assert fmt(None) == "–"
    assert fmt(float("nan")) == "–"
    assert fmt(1234.5) == "1,234"


def test_text_report_says_miss_for_a_missed_target() -> None:
    from benchmarks._harness import Target

    result = ScenarioResult(
        "x", "X", "", ["client"], [{"client": "a"}], targets=[Target("t", "≤ 1", "2", False)]
    )
    assert "MISS" in text_report([result], {"cpus": 2, "python": "3", "aiohttp": "3"})


def test_cli_writes_report_json_and_a_plot(tmp_path: Path) -> None:
    assert cli.main(["--quick", "--only", "storm", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in data["scenarios"]] == ["storm"]
    assert data["machine"]["cpus"] >= 1
    assert "PASS" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "storm.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_tail_sends_one_request_per_call_without_hedging_and_copies_with_it() -> None:
    rows = rows_by_client(run("tail"))
    raw, hedged = rows["aiohttp (no hedge)"], rows[tail.DEFAULT]
    assert raw["server req / call"] == 1.0
    assert raw["copies / call"] == 0.0
    assert all(r["ok"] == r["calls"] for r in rows.values())
    assert hedged["copies / call"] > 0  # type: ignore[operator]
    # A copy cancelled before it reached the server is not a request there.
    assert 1.0 < hedged["server req / call"] <= 1.0 + hedged["copies / call"]  # type: ignore[operator]


@pytest.mark.timeout(120)
def test_overload_reports_both_phases_of_every_client_and_the_adaptive_decision() -> None:
    result = run("overload")
    assert len(result.rows) == 2 * overload.units(TINY)
    assert {r["phase"] for r in result.rows} == {"W=16 (best 320/s)", "W=8 (best 160/s)"}
    limited = [r for r in result.rows if r["client"].startswith("ConcurrencyLimit(16, max_queue=0")]
    assert all(r["503 at server"] == 0 for r in limited)  # never more than 16 < 4 × W sent
    assert result.targets[-1].name.startswith("adaptive limit")


@pytest.mark.timeout(600)
def test_instructions_counts_more_instructions_per_request_through_the_chain() -> None:
    """valgrind counts each client's instructions; the chain executes more per request
    than raw aiohttp (a broken difference, e.g. the warm-up not cancelling out or counts
    not parsed, would not)."""
    if shutil.which("valgrind") is None:
        missing("valgrind is not installed (apt-get install valgrind)")
    rows = rows_by_client(run("instructions"))
    assert set(rows) >= {"aiohttp", "resilient", "aiohttp-retry"}
    for c in (1, 50):
        assert rows["aiohttp"][f"×aiohttp c={c}"] == 1.0
        raw = rows["aiohttp"][f"instructions/req c={c}"]
        assert raw > 50_000  # type: ignore[operator]  # a request through aiohttp's client
        assert rows["resilient"][f"instructions/req c={c}"] > raw  # type: ignore[operator]
