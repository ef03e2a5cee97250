"""Properties of the header parsers beyond "never raise" (see test_headers.py for that).

The documented contract (``resilient/_headers.py``): every parser returns ``None``
(absent or garbage) or a delay ``>= 0`` that is finite, or ``inf`` for "beyond any
wait" (a number too large to represent). These tests check what the value *is*:
round trips of every header form, the epoch/delta classification of reset values, the
choice among RateLimit policies, and the order in which headers are consulted; and for
:func:`parse_advertised`: totality, the bounds of an :class:`Advertised` value, "the
tightest wins" against a model, and the monotonic facts of that choice.
"""

from __future__ import annotations

import math
import os
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from resilient._headers import (
    EPOCH_MS_THRESHOLD,
    EPOCH_THRESHOLD,
    MAX_REMAINING,
    Advertised,
    advertises,
    parse_advertised,
    parse_ratelimit,
    parse_reset,
    parse_retry_after,
    retry_hint,
)

NOWS = st.floats(min_value=EPOCH_THRESHOLD, max_value=4e9)  # 2001 .. 2096, as time.time()
DATES = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))
DECIMALS = st.from_regex(r"[0-9]{1,30}(\.[0-9]{1,20})?", fullmatch=True)
# Anything a hostile server (or a broken proxy) could put in a header value as aiohttp
# hands it over: any code point, lone surrogates (surrogateescape) and controls included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)


def _contract(result: float | None) -> bool:
    if result is None:
        return True
    return isinstance(result, float) and result >= 0.0 and not math.isnan(result)


# --- totality over any code point -----------------------------------------------


@given(ANY_TEXT, NOWS)
def test_every_parser_is_total_over_any_code_point(value, now):
    assert _contract(parse_retry_after(value, now=now))
    assert _contract(parse_ratelimit(value))
    assert _contract(parse_reset(value, now=now))


@given(st.sampled_from(["9", " ", "t=", "r=0;t=1,", "Tue, "]), st.integers(4_000, 200_000))
def test_huge_values_are_parsed_or_refused_without_raising(unit, repeat):
    value = unit * (repeat // len(unit))
    for result in (
        parse_retry_after(value, now=EPOCH_THRESHOLD),
        parse_ratelimit(value),
        parse_reset(value, now=EPOCH_THRESHOLD),
    ):
        assert _contract(result)


# --- Retry-After ------------------------------------------------------------------


@given(DECIMALS, NOWS, st.sampled_from(["", " ", "\t"]))
def test_retry_after_delay_seconds_is_the_number_whatever_the_time(text, now, pad):
    assert parse_retry_after(pad + text + pad, now=now) == float(text)


@given(DATES, NOWS)
def test_retry_after_imf_fixdate_gives_the_seconds_until_then(when, now):
    value = format_datetime(when, usegmt=True)  # "Tue, 14 Nov 2023 23:13:20 GMT"
    assert parse_retry_after(value, now=now) == pytest.approx(
        max(0.0, when.timestamp() - now), abs=1e-6
    )


@given(DATES, NOWS)
def test_retry_after_asctime_is_read_as_gmt(when, now):
    value = when.strftime("%a %b ") + f"{when.day:2d}" + when.strftime(" %H:%M:%S %Y")
    assert parse_retry_after(value, now=now) == pytest.approx(
        max(0.0, when.timestamp() - now), abs=1e-6
    )


@given(DATES, st.integers(-1439, 1439), NOWS)
def test_retry_after_date_with_a_numeric_zone_applies_the_offset(when, minutes, now):
    sign, offset = ("+" if minutes >= 0 else "-"), abs(minutes)
    local = when + timedelta(minutes=minutes)  # the same instant, as seen in that zone
    value = local.strftime("%a, %d %b %Y %H:%M:%S ") + f"{sign}{offset // 60:02d}{offset % 60:02d}"
    assert parse_retry_after(value, now=now) == pytest.approx(
        max(0.0, when.timestamp() - now), abs=1e-6
    )


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata", "UTC"])
def test_retry_after_date_without_a_zone_is_gmt_whatever_the_local_zone(zone):
    saved = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        when = parse_retry_after("Tue Nov 14 23:13:20 2023", now=1_700_000_000.0)
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()
    assert when == 3600.0


@pytest.mark.parametrize(("length", "parsed"), [(64, True), (65, False)])
def test_retry_after_dates_longer_than_64_characters_are_refused(length, parsed):
    date = "Tue, 14 Nov 2023 23:13:20 GMT"
    value = date.replace(" GMT", " " * (length - len(date)) + " GMT")  # inner spaces
    assert len(value) == length
    assert parse_retry_after(value, now=1_700_000_000.0) == (3600.0 if parsed else None)


def test_retry_after_date_must_start_with_its_day_name():
    assert parse_retry_after("14 Nov 2023 23:13:20 GMT", now=1_700_000_000.0) is None


@given(DECIMALS.filter(lambda t: float(t) > 0.0), NOWS)
def test_retry_after_negative_or_signed_numbers_are_garbage(text, now):
    assert parse_retry_after("-" + text, now=now) is None
    assert parse_retry_after("+" + text, now=now) is None


@given(st.integers(309, 5000), NOWS)
def test_retry_after_beyond_float_range_is_beyond_any_wait(digits, now):
    assert parse_retry_after("1" + "0" * digits, now=now) == math.inf


# --- RateLimit --------------------------------------------------------------------

POLICY = st.tuples(
    st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
    st.one_of(st.none(), st.just(0), st.integers(1, 10_000)),  # r: absent, exhausted, room
    st.one_of(st.none(), st.from_regex(r"[0-9]{1,9}(\.[0-9]{1,6})?", fullmatch=True)),  # t
)


def _sf_item(name: str, remaining: int | None, reset: str | None) -> str:
    r = "" if remaining is None else f";r={remaining}"
    t = "" if reset is None else f";t={reset}"
    return f'"{name}"{r}{t}'


@given(st.lists(POLICY, min_size=1, max_size=6), st.sampled_from([",", ", ", " ,  "]))
def test_ratelimit_is_the_longest_reset_among_exhausted_policies(policies, sep):
    """A policy without ``t`` gives no reset; one without ``r`` counts as exhausted."""
    value = sep.join(_sf_item(*p) for p in policies)
    gating = [float(t) for _, r, t in policies if not r and t is not None]
    assert parse_ratelimit(value) == (max(gating) if gating else None)


@given(st.lists(POLICY, min_size=1, max_size=6))
def test_ratelimit_parameter_names_are_case_insensitive(policies):
    value = ", ".join(_sf_item(*p) for p in policies)
    assert parse_ratelimit(value.upper()) == parse_ratelimit(value)


@pytest.mark.parametrize(("length", "expected"), [(4096, 30.0), (4097, None)])
def test_ratelimit_reads_headers_of_up_to_4096_characters_only(length, expected):
    value = '"default";r=0;t=30'
    value += " " * (length - len(value))  # OWS before the end of the list
    assert parse_ratelimit(value) == expected


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.integers(0, 10**6))
def test_ratelimit_early_draft_dictionary_gates_only_when_nothing_remains(limit, left, reset):
    value = f"limit={limit}, remaining={left}, reset={reset}"
    assert parse_ratelimit(value) == (float(reset) if left == 0 else None)


# --- RateLimit-Reset / X-RateLimit-Reset ------------------------------------------


@given(st.floats(0.0, EPOCH_THRESHOLD - 1.0).map(lambda f: round(f, 3)), NOWS)
def test_reset_below_the_epoch_threshold_is_delta_seconds(delta, now):
    assert parse_reset(repr(delta), now=now) == delta


@given(st.integers(int(EPOCH_THRESHOLD), int(EPOCH_MS_THRESHOLD) - 1), NOWS)
def test_reset_epoch_seconds_is_the_time_until_then_never_negative(epoch, now):
    assert parse_reset(str(epoch), now=now) == max(0.0, epoch - now)


@given(st.integers(int(EPOCH_MS_THRESHOLD), 10**16), NOWS)
def test_reset_epoch_milliseconds_is_the_time_until_then_never_negative(epoch_ms, now):
    assert parse_reset(str(epoch_ms), now=now) == pytest.approx(
        max(0.0, epoch_ms / 1000.0 - now), abs=1e-6
    )


# --- which header is consulted ------------------------------------------------------

NAMES = ["Retry-After", "RateLimit", "RateLimit-Reset", "X-RateLimit-Reset"]
VALUES = st.one_of(
    st.sampled_from(["soon", "-1", "", "5", "r=0;t=7", '"q";r=3;t=9', "1700000100", "0"]),
    ANY_TEXT,
)


@given(st.dictionaries(st.sampled_from(NAMES), VALUES), NOWS)
def test_retry_hint_is_the_first_header_that_parses_in_the_documented_order(headers, now):
    parsers = {
        "Retry-After": lambda v: parse_retry_after(v, now=now),
        "RateLimit": parse_ratelimit,
        "RateLimit-Reset": lambda v: parse_reset(v, now=now),
        "X-RateLimit-Reset": lambda v: parse_reset(v, now=now),
    }
    expected = next(
        (
            (delay, name)
            for name in NAMES
            if (delay := parsers[name](headers.get(name))) is not None
        ),
        None,
    )
    assert retry_hint(headers, now=now) == expected


# --- parse_advertised ---------------------------------------------------------------

ADVERTISING = [
    "RateLimit-Policy",
    "RateLimit",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]
SF_ISH = st.lists(
    st.sampled_from(
        [
            '"a"',
            "b",
            ";",
            ",",
            " ",
            "r=",
            "t=",
            "q=",
            "w=",
            "pk=",
            "qu=",
            "0",
            "7",
            "-",
            ".",
            ":YQ==:",
            "?1",
            '"requests"',
            "remaining=",
            "reset=",
            "limit=",
        ]
    ),
    max_size=30,
).map("".join)


def _valid_advertised(quota: Advertised | None) -> bool:
    if quota is None:
        return True
    return (
        type(quota.remaining) is int
        and 0 <= quota.remaining <= MAX_REMAINING
        and type(quota.reset) is float
        and quota.reset >= 0.0  # NaN fails this
        and (
            quota.limit is None or (type(quota.limit) is int and 0 <= quota.limit <= MAX_REMAINING)
        )
        and (quota.window is None or (type(quota.window) is float and quota.window >= 0.0))
        and type(quota.policy) is str
        and (quota.partition is None or type(quota.partition) is str)
    )


@given(st.dictionaries(st.sampled_from(ADVERTISING), st.one_of(ANY_TEXT, SF_ISH)), NOWS)
def test_advertised_is_total_and_keeps_its_bounds_over_any_text(fields, now):
    assert _valid_advertised(parse_advertised(CIMultiDict(fields), now=now))


@given(st.sampled_from(["9", " ", '"a";r=0;t=1,', "r=", ";", ",", '"']), st.integers(100, 4096))
def test_advertised_reads_long_hostile_fields_without_raising(unit, length):
    value = (unit * (length // len(unit) + 1))[:length]
    fields = CIMultiDict({name: value for name in ADVERTISING})
    assert _valid_advertised(parse_advertised(fields, now=EPOCH_THRESHOLD))


# A draft-11 policy as generated: name, r, t (None: absent), q, w (None: absent).
QUOTA = st.tuples(
    st.integers(0, 10**6),
    st.one_of(st.none(), st.integers(0, 10**6)),
    st.integers(0, 10**6),
    st.one_of(st.none(), st.integers(1, 10**6)),
)


def _draft11(quotas):
    """(RateLimit-Policy, RateLimit, the Advertised value each usable item should give)."""
    policy, ratelimit, expected = [], [], []
    for i, (r, t, q, w) in enumerate(quotas):
        name = f"p{i}"
        policy.append(f'"{name}";q={q}' + ("" if w is None else f";w={w}"))
        ratelimit.append(f'"{name}";r={r}' + ("" if t is None else f";t={t}"))
        reset = t if t is not None else w
        if reset is not None:
            window = None if w is None else float(w)
            expected.append(Advertised(r, float(reset), q, window, name))
    return ", ".join(policy), ", ".join(ratelimit), expected


def _draft11_headers(quotas) -> CIMultiDict[str]:
    policy, ratelimit, _ = _draft11(quotas)
    return CIMultiDict({"RateLimit-Policy": policy, "RateLimit": ratelimit})


def _tightness(quota: Advertised) -> tuple[int, float]:
    """The documented order, written independently: exhausted > paced > free."""
    if quota.reset == 0.0:
        return (0, -quota.remaining)
    if quota.remaining == 0:
        return (2, quota.reset)
    return (1, -(quota.remaining / quota.reset))


@given(st.lists(QUOTA, min_size=1, max_size=16))
def test_advertised_is_the_tightest_usable_policy(quotas):
    quota = parse_advertised(_draft11_headers(quotas), now=EPOCH_THRESHOLD)
    usable = _draft11(quotas)[2]
    if not usable:
        assert quota is None
        return
    assert quota in usable  # one of the parsed policies, joined with its own q and w
    assert _tightness(quota) == max(_tightness(u) for u in usable)
    assert quota == next(u for u in usable if _tightness(u) == _tightness(quota))  # first
    exhausted = [u.reset for u in usable if u.remaining == 0 and u.reset > 0.0]
    if exhausted:  # the caller must wait, and for the longest of those resets
        assert quota.remaining == 0
        assert quota.reset == max(exhausted)


@given(st.lists(QUOTA, min_size=1, max_size=15), QUOTA)
def test_advertising_one_more_policy_never_loosens_the_result(quotas, extra):
    before = parse_advertised(_draft11_headers(quotas), now=0.0)
    after = parse_advertised(_draft11_headers([*quotas, extra]), now=0.0)
    if before is not None:
        assert after is not None
        assert _tightness(after) >= _tightness(before)


@given(st.lists(QUOTA, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_the_order_of_policies_changes_only_ties(quotas, rng):
    shuffled = quotas[:]
    rng.shuffle(shuffled)
    first, second = (parse_advertised(_draft11_headers(q), now=0.0) for q in (quotas, shuffled))
    if first is None:
        assert second is None
    else:
        assert _tightness(first) == _tightness(second)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_fewer_remaining_never_loosens_a_single_quota(remaining, reset, fewer):
    def at(r: int) -> Advertised | None:
        return parse_advertised({"RateLimit": f'"p";r={r};t={reset}'}, now=0.0)

    assert _tightness(at(max(0, remaining - fewer))) >= _tightness(at(remaining))


@given(
    st.sampled_from(["RateLimit-", "X-RateLimit-"]),
    st.integers(0, 10**15),
    st.integers(0, int(EPOCH_THRESHOLD) - 1),
    st.one_of(st.none(), st.integers(0, 10**9)),
    NOWS,
)
def test_legacy_trio_round_trips(prefix, remaining, reset, limit, now):
    fields = {prefix + "Remaining": str(remaining), prefix + "Reset": str(reset)}
    if limit is not None:
        fields[prefix + "Limit"] = str(limit)
    assert parse_advertised(CIMultiDict(fields), now=now) == Advertised(
        remaining, float(reset), limit
    )


@given(st.integers(int(EPOCH_THRESHOLD), int(EPOCH_MS_THRESHOLD) - 1), NOWS)
def test_x_ratelimit_epoch_reset_is_the_time_until_then_never_negative(epoch, now):
    fields = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(epoch)}
    assert parse_advertised(fields, now=now) == Advertised(0, max(0.0, epoch - now))


@given(st.integers(0, 10**400), st.integers(0, 10**400))
def test_draft11_any_size_of_r_and_t_is_clipped_or_beyond_any_wait(remaining, reset):
    quota = parse_advertised({"RateLimit": f'"p";r={remaining};t={reset}'}, now=0.0)
    assert quota is not None
    assert quota.remaining == min(remaining, MAX_REMAINING)
    assert quota.reset == (float(reset) if reset < 10**308 else math.inf)


ADVERTISING_NAMES = (
    "RateLimit", "RateLimit-Policy", "RateLimit-Limit", "RateLimit-Remaining",
    "RateLimit-Reset", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "Retry-After", "Content-Type",
)  # fmt: skip


@given(
    st.dictionaries(
        st.sampled_from(ADVERTISING_NAMES).map(lambda n: n.upper() if len(n) % 2 else n),
        st.sampled_from(["0", "5", "30", '"d";r=0;t=9', '"d";q=5;w=9', "1700000100", "x"]),
    ),
    NOWS,
)
def test_a_response_that_does_not_advertise_parses_to_nothing(fields, now):
    """``advertises`` is the cheap gate before the wall-clock read: whatever it rejects,
    ``parse_advertised`` would have rejected too."""
    headers = CIMultiDict(fields)
    if not advertises(headers):
        assert parse_advertised(headers, now=now) is None
