"""Pure header parsers: Retry-After, RateLimit, (X-)RateLimit-Reset, advertised quotas;
never raise."""

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
    MAX_REMAINING,
    Advertised,
    parse_advertised,
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


# --- parse_advertised: the quota a server advertises on every response ---------------


def _advertised(now: float = NOW, **fields: str) -> Advertised | None:
    """parse_advertised over aiohttp's headers; ``X_RateLimit_Reset`` names X-RateLimit-Reset."""
    headers = CIMultiDict({name.replace("_", "-"): value for name, value in fields.items()})
    return parse_advertised(headers, now=now)


POLICIES = '"burst";q=100;w=60, "daily";q=1000;w=86400'


def test_no_advertising_headers_is_none():
    headers = CIMultiDict({"Content-Type": "application/json", "Retry-After": "5"})
    assert parse_advertised(headers, now=NOW) is None


def test_draft11_policy_and_ratelimit_are_joined_by_name():
    quota = _advertised(RateLimit_Policy='"burst";q=100;w=60', RateLimit='"burst";r=40;t=30')
    assert quota == Advertised(remaining=40, reset=30.0, limit=100, window=60.0, policy="burst")


def test_draft11_exhausted_policy_wins_over_one_with_room():
    quota = _advertised(
        RateLimit_Policy=POLICIES, RateLimit='"burst";r=0;t=30, "daily";r=500;t=3600'
    )
    assert quota == Advertised(0, 30.0, 100, 60.0, "burst")


def test_draft11_longest_reset_among_exhausted_policies():
    value = '"burst";r=0;t=30, "daily";r=0;t=3600'
    assert _advertised(RateLimit_Policy=POLICIES, RateLimit=value) == Advertised(
        0, 3600.0, 1000, 86400.0, "daily"
    )


def test_draft11_lowest_allowed_rate_wins_when_none_is_exhausted():
    # burst: 50 in 30 s (1.7/s); daily: 500 in 3600 s (0.14/s): the day is tighter.
    value = '"burst";r=50;t=30, "daily";r=500;t=3600'
    assert _advertised(RateLimit_Policy=POLICIES, RateLimit=value).policy == "daily"
    value = '"burst";r=1;t=30, "daily";r=500;t=3600'  # 0.03/s now
    assert _advertised(RateLimit_Policy=POLICIES, RateLimit=value).policy == "burst"


def test_draft11_a_reset_of_zero_does_not_constrain():
    value = '"burst";r=0;t=0, "daily";r=500;t=3600'  # burst restarts now
    assert _advertised(RateLimit_Policy=POLICIES, RateLimit=value).policy == "daily"


def test_draft11_only_resets_of_zero_give_the_fewest_remaining():
    value = '"a";r=9;t=0, "b";r=3;t=0, "c";r=5;t=0'
    assert _advertised(RateLimit=value) == Advertised(3, 0.0, policy="b")


def test_draft11_ties_go_to_the_first_listed():
    value = '"a";r=0;t=30, "b";r=0;t=30'
    assert _advertised(RateLimit=value).policy == "a"


def test_draft11_without_t_the_window_of_the_policy_is_the_reset():
    quota = _advertised(RateLimit_Policy=POLICIES, RateLimit='"daily";r=0')
    assert quota == Advertised(0, 86400.0, 1000, 86400.0, "daily")


@pytest.mark.parametrize(
    ("policy", "ratelimit"),
    [
        (None, '"burst";r=0'),  # no t, no policy
        ('"burst";q=100', '"burst";r=0'),  # no t, policy without w
        (POLICIES, '"burst";t=30'),  # no r
        (POLICIES, '"burst";r=-1;t=30'),  # negative r
        (POLICIES, '"burst";r=5.0;t=30'),  # Decimal r
        (POLICIES, '"burst";r="5";t=30'),  # String r
        (POLICIES, '"burst";r;t=30'),  # Boolean r
        (POLICIES, '"burst";r=0;t=-30'),  # negative t
        (POLICIES, '"burst";r=0;t=soon'),  # Token t
        (POLICIES, '"burst";r=0;t=30;pk=5'),  # pk of the wrong type
        (POLICIES, "5;r=0;t=30"),  # a number is no policy name
        (POLICIES, '"unterminated;r=0;t=30'),
        (POLICIES, ""),
    ],
)
def test_draft11_unusable_items_are_ignored(policy, ratelimit):
    fields = {"RateLimit": ratelimit} | ({} if policy is None else {"RateLimit_Policy": policy})
    assert _advertised(**fields) is None


def test_draft11_a_garbage_item_does_not_spoil_the_rest_of_the_list():
    value = 'garbage(, "burst";r=-1;t=30, %%%, "daily";r=2;t=60,, "x";r=1'
    assert _advertised(RateLimit=value) == Advertised(2, 60.0, policy="daily")


def test_draft11_tokens_name_policies_too():
    quota = _advertised(RateLimit_Policy="burst;q=100;w=60", RateLimit="burst;r=0;t=30")
    assert quota == Advertised(0, 30.0, 100, 60.0, "burst")


def test_draft11_item_without_its_policy_has_no_limit_or_window():
    quota = _advertised(RateLimit_Policy=POLICIES, RateLimit='"hourly";r=7;t=90')
    assert quota == Advertised(7, 90.0, None, None, "hourly")


@pytest.mark.parametrize("unit", ['"content-bytes"', '"concurrent-requests"', "bytes"])
def test_draft11_quotas_not_counted_in_requests_are_ignored(unit):
    policy = f'"bytes";q=65536;w=60;qu={unit}, "burst";q=100;w=60'
    value = '"bytes";r=0;t=50, "burst";r=10;t=30'
    assert _advertised(RateLimit_Policy=policy, RateLimit=value) == Advertised(
        10, 30.0, 100, 60.0, "burst"
    )


@pytest.mark.parametrize("unit", ['"requests"', '"request"', "requests"])
def test_draft11_quotas_counted_in_requests_are_read(unit):
    policy = f'"burst";q=100;w=60;qu={unit}'
    assert _advertised(RateLimit_Policy=policy, RateLimit='"burst";r=3;t=9').limit == 100


@pytest.mark.parametrize("policy", ['"burst";q=-1;w=60', '"burst";q=1.5', '"burst";w=60'])
def test_draft11_policy_with_a_bad_or_missing_q_is_ignored(policy):
    quota = _advertised(RateLimit_Policy=policy, RateLimit='"burst";r=3;t=9')
    assert quota == Advertised(3, 9.0, None, None, "burst")


def test_draft11_partition_key_byte_sequence_is_kept_as_its_text():
    policy = '"peruser";q=100;w=60;pk=:cHJfMDAwMQ==:'
    quota = _advertised(RateLimit_Policy=policy, RateLimit='"peruser";r=4;t=20')
    assert quota.partition == "cHJfMDAwMQ=="
    quota = _advertised(RateLimit_Policy=policy, RateLimit='"peruser";r=4;t=20;pk=:b3RoZXI=:')
    assert quota.partition == "b3RoZXI="  # the response's own key wins


def test_draft11_first_policy_of_a_name_wins():
    policy = '"burst";q=100;w=60, "burst";q=5;w=1'
    assert _advertised(RateLimit_Policy=policy, RateLimit='"burst";r=3;t=9').limit == 100


def test_draft11_parameters_are_read_in_any_case_and_with_spaces():
    value = '"burst" ; R=0 ;  T=30 ,"daily";r=1;t=9'
    assert _advertised(RateLimit=value) == Advertised(0, 30.0, policy="burst")


def test_draft11_string_escapes_in_names_are_unescaped():
    quota = _advertised(RateLimit=r'"a\"b\\c";r=0;t=1')
    assert quota.policy == 'a"b\\c'


def test_draft11_fields_split_over_several_lines_are_joined():
    headers = CIMultiDict(
        [
            ("RateLimit-Policy", '"burst";q=100;w=60'),
            ("RateLimit-Policy", '"daily";q=1000;w=86400'),
            ("RateLimit", '"burst";r=50;t=30'),
            ("ratelimit", '"daily";r=0;t=3600'),
        ]
    )
    assert parse_advertised(headers, now=NOW) == Advertised(0, 3600.0, 1000, 86400.0, "daily")


def test_draft11_at_most_16_members_are_read():
    room = ", ".join(f'"p{i}";r=5;t=10' for i in range(16))
    assert _advertised(RateLimit=room + ', "late";r=0;t=99').policy == "p0"


def test_draft11_huge_numbers_are_clipped_or_beyond_any_wait():
    quota = _advertised(RateLimit=f'"a";r={"9" * 400};t={"9" * 400}')
    assert quota == Advertised(MAX_REMAINING, math.inf, policy="a")
    quota = _advertised(RateLimit_Policy=f'"a";q={"9" * 30};w={"9" * 400}', RateLimit='"a";r=1')
    assert quota == Advertised(1, math.inf, MAX_REMAINING, math.inf, "a")


def test_draft11_longer_than_4096_characters_is_ignored():
    value = '"burst";r=0;t=30' + " " * 4081
    assert _advertised(RateLimit=value) is None
    assert _advertised(RateLimit=value[:-1]) == Advertised(0, 30.0, policy="burst")


def test_draft11_decimal_t_is_read():
    assert _advertised(RateLimit='"a";r=0;t=2.5').reset == 2.5


def test_early_draft_dictionary_in_ratelimit():
    quota = _advertised(RateLimit="limit=100, remaining=0, reset=30")
    assert quota == Advertised(0, 30.0, 100)
    assert _advertised(RateLimit="LIMIT=100, REMAINING=7, RESET=3") == Advertised(7, 3.0, 100)


@pytest.mark.parametrize("value", ["limit=100, remaining=5", "remaining=-1, reset=3", "reset=3"])
def test_early_draft_dictionary_without_a_usable_remaining_or_reset_is_none(value):
    assert _advertised(RateLimit=value) is None


def test_older_draft_trio():
    quota = _advertised(RateLimit_Limit="100", RateLimit_Remaining="5", RateLimit_Reset="7")
    assert quota == Advertised(5, 7.0, 100)


def test_older_draft_limit_with_policy_comments_gives_the_window():
    fields = {"RateLimit_Remaining": "5", "RateLimit_Reset": "7"}
    assert _advertised(RateLimit_Limit="100, 100;w=60", **fields) == Advertised(5, 7.0, 100, 60.0)
    assert _advertised(RateLimit_Limit="100;w=60", **fields).window == 60.0
    assert _advertised(RateLimit_Limit="10, 10;w=1, 50;w=60", **fields).window == 1.0
    # the window of another quota is not this one's
    assert _advertised(RateLimit_Limit="10, 50;w=60", **fields) == Advertised(5, 7.0, 10)


@pytest.mark.parametrize("limit", ["lots", "-5", "", "1e9"])
def test_older_draft_garbage_limit_leaves_limit_unknown(limit):
    quota = _advertised(RateLimit_Limit=limit, RateLimit_Remaining="5", RateLimit_Reset="7")
    assert quota == Advertised(5, 7.0)


@pytest.mark.parametrize(("remaining", "floored"), [("5.0", 5), ("4.7", 4), (" 3 ", 3), ("0", 0)])
def test_free_text_remaining_is_floored(remaining, floored):
    quota = _advertised(X_RateLimit_Remaining=remaining, X_RateLimit_Reset="9")
    assert quota == Advertised(floored, 9.0)


@pytest.mark.parametrize(("prefix"), ["RateLimit", "X_RateLimit"])
@pytest.mark.parametrize(
    ("remaining", "reset"),
    [("5", None), (None, "9"), ("-1", "9"), ("many", "9"), ("5", "-9"), ("5", "soon")],
)
def test_legacy_without_a_usable_remaining_or_reset_is_none(prefix, remaining, reset):
    fields = {f"{prefix}_Limit": "100"}
    if remaining is not None:
        fields[f"{prefix}_Remaining"] = remaining
    if reset is not None:
        fields[f"{prefix}_Reset"] = reset
    assert _advertised(**fields) is None


def test_x_ratelimit_reset_in_epoch_seconds():
    quota = _advertised(
        X_RateLimit_Limit="5000", X_RateLimit_Remaining="4999", X_RateLimit_Reset=str(int(NOW) + 90)
    )
    assert quota == Advertised(4999, pytest.approx(90.0), 5000)


def test_x_ratelimit_reset_in_epoch_milliseconds():
    quota = _advertised(X_RateLimit_Remaining="0", X_RateLimit_Reset=str(int(NOW * 1000) + 4500))
    assert quota.remaining == 0
    assert quota.reset == pytest.approx(4.5)


def test_x_ratelimit_reset_in_the_past_means_now():
    assert _advertised(X_RateLimit_Remaining="0", X_RateLimit_Reset=str(int(NOW) - 5)).reset == 0.0


def test_x_ratelimit_huge_remaining_is_clipped():
    quota = _advertised(X_RateLimit_Remaining="9" * 400, X_RateLimit_Reset="9" * 400)
    assert quota == Advertised(MAX_REMAINING, math.inf)


def test_the_first_usable_dialect_wins_and_they_are_not_mixed():
    fields = {
        "RateLimit": '"burst";r=9;t=30',
        "RateLimit_Remaining": "0",
        "RateLimit_Reset": "60",
        "X_RateLimit_Remaining": "0",
        "X_RateLimit_Reset": "120",
    }
    assert _advertised(**fields) == Advertised(9, 30.0, policy="burst")
    del fields["RateLimit"]
    assert _advertised(**fields) == Advertised(0, 60.0)
    del fields["RateLimit_Remaining"]
    assert _advertised(**fields) == Advertised(0, 120.0)


def test_an_unusable_dialect_falls_through_to_the_next():
    fields = {"RateLimit": "garbage", "RateLimit_Remaining": "x", "RateLimit_Reset": "1"}
    assert _advertised(**fields, X_RateLimit_Remaining="3", X_RateLimit_Reset="4") == Advertised(
        3, 4.0
    )


def test_policy_alone_says_nothing_about_now():
    assert _advertised(RateLimit_Policy=POLICIES) is None


def test_advertised_works_on_a_plain_dict_too():
    headers = {"RateLimit-Policy": POLICIES, "RateLimit": '"burst";r=0;t=30'}
    assert parse_advertised(headers, now=NOW) == Advertised(0, 30.0, 100, 60.0, "burst")


def test_advertised_is_an_immutable_value():
    quota = Advertised(1, 2.0)
    with pytest.raises(AttributeError):
        quota.remaining = 5  # type: ignore[misc]
    assert quota == Advertised(remaining=1, reset=2.0, policy="default")
    assert not hasattr(quota, "__dict__")
