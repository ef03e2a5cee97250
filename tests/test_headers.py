"""Pure header parsers: Retry-After, RateLimit, (X-)RateLimit-Reset; never raise."""

from __future__ import annotations

import calendar
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from resilient._headers import (
    EPOCH_MS_THRESHOLD,
    EPOCH_THRESHOLD,
    parse_ratelimit,
    parse_reset,
    parse_retry_after,
    retry_delay,
    retry_hint,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
IN_AN_HOUR = calendar.timegm((2023, 11, 14, 23, 13, 20)) - NOW  # 3600 s


# --- Retry-After: delay-seconds -------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), ("0", 0.0), (" 7 ", 7.0)])
def test_retry_after_delay_seconds(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_accepts_a_decimal_fraction():
    assert parse_retry_after("1.5", now=NOW) == 1.5


def test_retry_after_too_large_to_represent_is_infinite():
    assert parse_retry_after("9" * 400, now=NOW) == math.inf


@pytest.mark.parametrize("value", ["soon", "-5", "1e309", "+5", "5s", "0x10", "", None, "١٢"])
def test_retry_after_garbage_is_none(value):
    assert parse_retry_after(value, now=NOW) is None


# --- Retry-After: HTTP-date -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Tue, 14 Nov 2023 23:13:20 GMT",  # IMF-fixdate
        "Tuesday, 14-Nov-23 23:13:20 GMT",  # RFC 850
        "Tue Nov 14 23:13:20 2023",  # asctime (no zone: GMT)
    ],
)
def test_retry_after_http_date_forms_give_the_seconds_until_then(value):
    assert parse_retry_after(value, now=NOW) == pytest.approx(IN_AN_HOUR)


def test_retry_after_date_in_the_past_means_now():
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 32 Foo 2099 99:99:99 GMT",
        "Mon, 31 Feb 2099 10:00:00 GMT",
        "Fri, 31 Dec 99999 23:59:59 GMT",
        "Fri, 31 Dec 2099 23:59:59 +9999",
        "Tue, 14 Nov 2023 25:00:00 GMT",
        "Tuesday",
        "Tue, " + "9" * 400,
    ],
)
def test_retry_after_impossible_date_is_none(value):
    assert parse_retry_after(value, now=NOW) is None


# --- RateLimit (IETF draft) -----------------------------------------------------


def test_ratelimit_draft_structured_item_gives_t():
    assert parse_ratelimit('"default";r=0;t=30') == 30.0


def test_ratelimit_early_draft_dictionary_gives_reset():
    assert parse_ratelimit("limit=10, remaining=0, reset=30") == 30.0


def test_ratelimit_longest_reset_among_exhausted_policies():
    value = '"burst";r=0;t=10, "day";r=0;t=3600, "hour";r=40;t=99999'
    assert parse_ratelimit(value) == 3600.0


def test_ratelimit_policy_with_room_left_does_not_gate():
    assert parse_ratelimit('"default";r=5;t=10') is None


@pytest.mark.parametrize("value", ['"default";r=0', "t=-5", "t=soon", "", None, "x" * 5000])
def test_ratelimit_without_a_usable_reset_is_none(value):
    assert parse_ratelimit(value) is None


# --- RateLimit-Reset / X-RateLimit-Reset ----------------------------------------


def test_reset_small_value_is_delta_seconds():
    assert parse_reset("30", now=NOW) == 30.0


def test_reset_epoch_seconds_gives_the_seconds_until_then():
    assert parse_reset(str(int(NOW) + 90), now=NOW) == pytest.approx(90.0)


def test_reset_epoch_milliseconds_gives_the_seconds_until_then():
    assert parse_reset(str(int(NOW * 1000) + 4500), now=NOW) == pytest.approx(4.5)


def test_reset_epoch_threshold_separates_delta_from_epoch():
    below = EPOCH_THRESHOLD - 1
    assert parse_reset(f"{below:.0f}", now=NOW) == below  # 31 years as a delta
    assert parse_reset(f"{EPOCH_THRESHOLD:.0f}", now=NOW) == 0.0  # 2001: in the past
    assert parse_reset(f"{EPOCH_MS_THRESHOLD:.0f}", now=NOW) == 0.0  # 2001 in ms: past


def test_reset_epoch_in_the_past_means_now():
    assert parse_reset(str(int(NOW) - 60), now=NOW) == 0.0


@pytest.mark.parametrize("value", ["-5", "soon", "1e9", "", None])
def test_reset_garbage_is_none(value):
    assert parse_reset(value, now=NOW) is None


def test_reset_too_large_to_represent_is_infinite():
    assert parse_reset("9" * 400, now=NOW) == math.inf


# --- retry_delay: which header wins ---------------------------------------------


def test_retry_after_wins_over_the_ratelimit_headers():
    headers = CIMultiDict({"retry-after": "5", "RateLimit": "r=0;t=50", "X-RateLimit-Reset": "9"})
    assert retry_hint(headers, now=NOW) == (5.0, "Retry-After")


def test_garbage_retry_after_falls_through_to_ratelimit():
    headers = CIMultiDict({"Retry-After": "soon", "RateLimit": '"q";r=0;t=50'})
    assert retry_hint(headers, now=NOW) == (50.0, "RateLimit")


def test_x_ratelimit_reset_is_the_last_resort():
    headers = CIMultiDict({"X-RateLimit-Reset": str(int(NOW) + 12)})
    assert retry_delay(headers, now=NOW) == pytest.approx(12.0)
    assert retry_hint(headers, now=NOW) == (pytest.approx(12.0), "X-RateLimit-Reset")


def test_no_retry_headers_is_none():
    assert retry_delay(CIMultiDict({"Content-Type": "text/plain"}), now=NOW) is None


# --- properties -----------------------------------------------------------------

NOWS = st.floats(min_value=0.0, max_value=4e9)
HOSTILE = st.one_of(
    st.text(max_size=200),
    st.from_regex(r"[A-Za-z]{3}, [0-9]{1,3} [A-Za-z]{3} [0-9]{1,6} [0-9:]{1,9} [A-Z+0-9-]{0,6}"),
    st.from_regex(r"[A-Za-z]{3,9} [A-Za-z]{3} +[0-9]{1,3} [0-9:]{1,9} [0-9]{1,6}"),
    st.from_regex(r"[-+]?[0-9]{0,400}(\.[0-9]{0,50})?([eE][-+]?[0-9]{1,4})?"),
    st.from_regex(r'("[a-z]*";)?([rt]|reset|remaining)=[-0-9."]{0,30}([;,] ?[a-z]+=[-0-9]*){0,4}'),
)


def _valid(result: float | None) -> bool:
    return result is None or result == math.inf or (math.isfinite(result) and result >= 0.0)


@given(HOSTILE, NOWS)
def test_retry_after_never_raises_and_is_none_inf_or_non_negative(value, now):
    assert _valid(parse_retry_after(value, now=now))


@given(HOSTILE)
def test_ratelimit_never_raises_and_is_none_inf_or_non_negative(value):
    assert _valid(parse_ratelimit(value))


@given(HOSTILE, NOWS)
def test_reset_never_raises_and_is_none_inf_or_non_negative(value, now):
    assert _valid(parse_reset(value, now=now))


@given(
    st.dictionaries(
        st.sampled_from(
            ["Retry-After", "RateLimit", "RateLimit-Reset", "X-RateLimit-Reset", "Other"]
        ),
        HOSTILE,
    ),
    NOWS,
)
def test_retry_delay_never_raises_and_is_none_inf_or_non_negative(headers, now):
    assert _valid(retry_delay(headers, now=now))


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_integer_round_trips(seconds):
    assert parse_retry_after(str(seconds), now=NOW) == float(seconds)
