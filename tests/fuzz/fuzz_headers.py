"""Fuzz the header parsers: they must be total and keep their contract on any bytes.

The target, :func:`check`, decodes the input as aiohttp decodes a header value (UTF-8,
undecodable bytes as lone surrogates) and feeds it to every parser, to each header
that :func:`resilient._headers.retry_hint` reads, and to a mixed header set built
from its parts; and likewise to :func:`resilient._headers.parse_advertised`: the input
as ``RateLimit`` alone, as the ``RateLimit`` of a fixed ``RateLimit-Policy`` (and the
reverse), as each field of the older trio, as a second ``RateLimit`` field line, and
its newline-separated parts as the eight fields in the order of ``ADVERTISING`` (so a
seed ``policy\nratelimit`` joins the two).
It raises only if a parser raises or breaks the contract (``None``, or a delay ``>= 0``
that is finite or ``inf`` for "beyond any wait"; an ``Advertised`` whose counts are
ints in ``[0, MAX_REMAINING]`` and whose times are floats ``>= 0``).

Run the coverage-guided fuzzer (atheris, libFuzzer flags after the script)::

    .venv/bin/python tests/fuzz/fuzz_headers.py -max_total_time=60 /tmp/fuzz-out tests/fuzz/corpus

libFuzzer writes new inputs into the *first* directory only: keep the seed corpus
(``tests/fuzz/corpus``, one header value per file) second. A crash is saved as
``crash-<sha1>``; add it to the corpus once fixed. ``test_fuzz_headers.py`` replays
the corpus, runs this fuzzer for a bounded number of inputs, and runs hypothesis with
a large example budget on the same target.
"""

from __future__ import annotations

import email._parseaddr
import email.utils
import math
import sys
import types
from collections.abc import Mapping

from multidict import CIMultiDict

from resilient import _headers
from resilient._headers import (
    MAX_REMAINING,
    Advertised,
    parse_advertised,
    parse_ratelimit,
    parse_reset,
    parse_retry_after,
    retry_hint,
)

NOWS = (0.0, 1_000_000_000.0, 1_700_000_000.0, 4_102_444_800.0)
"""Wall-clock times to parse at: the epoch, the epoch threshold, 2023, 2100."""
HEADERS = ("Retry-After", "RateLimit", "RateLimit-Reset", "X-RateLimit-Reset")
ADVERTISING = (
    "RateLimit-Policy",
    "RateLimit",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
"""The fields parse_advertised reads; a seed's newline-separated parts fill them in order."""
POLICY = '"burst";q=100;w=60;pk=:cHJfMDE=:, "daily";q=1000;w=86400, "bytes";q=9;qu="content-bytes"'
RATELIMIT = '"burst";r=0;t=30, "daily";r=500, "bytes";r=0;t=99'


def _ok(result: float | None) -> bool:
    return result is None or (type(result) is float and result >= 0.0 and not math.isnan(result))


def _expect(result: float | None, what: str, value: str) -> None:
    if not _ok(result):
        raise AssertionError(f"{what}({value!r}) broke the contract: {result!r}")


def check(data: bytes, *, every_set: bool = False) -> None:
    """Run every parser on ``data``; raise if one raises or breaks its contract.

    parse_advertised runs on every header set only with ``every_set`` (the seed corpus);
    otherwise on the one set that the input's last byte picks."""
    value = data.decode("utf-8", "surrogateescape")
    now = NOWS[data[0] % len(NOWS)] if data else NOWS[2]
    _expect(parse_retry_after(value, now=now), "parse_retry_after", value)
    _expect(parse_ratelimit(value), "parse_ratelimit", value)
    _expect(parse_reset(value, now=now), "parse_reset", value)
    parts = value.split("\n", len(HEADERS) - 1)
    for headers in [{name: value} for name in HEADERS] + [dict(zip(HEADERS, parts, strict=False))]:
        hint = retry_hint(headers, now=now)
        if hint is not None:
            delay, name = hint
            _expect(delay, "retry_hint", value)
            if name not in headers:
                raise AssertionError(f"retry_hint named {name!r}, absent from {headers!r}")
    check_advertised(value, now, choose=None if every_set or not data else data[-1])


def _advertised_ok(quota: Advertised | None) -> bool:
    if quota is None:
        return True
    return (
        type(quota.remaining) is int
        and 0 <= quota.remaining <= MAX_REMAINING
        and type(quota.reset) is float
        and quota.reset >= 0.0
        and (
            quota.limit is None or (type(quota.limit) is int and 0 <= quota.limit <= MAX_REMAINING)
        )
        and (quota.window is None or (type(quota.window) is float and quota.window >= 0.0))
        and type(quota.policy) is str
        and (quota.partition is None or type(quota.partition) is str)
    )


def check_advertised(value: str, now: float, *, choose: int | None = None) -> None:
    """parse_advertised on ``value`` in every field it reads, alone and together.

    ``choose``: run only the set it picks (the fuzzer's choice, so that a bounded run
    stays cheap); ``None``: every set."""
    sets: list[Mapping[str, str]] = [
        {"RateLimit": value},  # the draft-11 List, then the draft-03..07 Dictionary
        {"RateLimit-Policy": POLICY, "RateLimit": value},
        {"RateLimit-Policy": value, "RateLimit": RATELIMIT},
        {name: value for name in ADVERTISING[2:5]},  # the older trio, X- alike
        CIMultiDict([("RateLimit", RATELIMIT), ("ratelimit", value)]),  # two field lines
        dict(zip(ADVERTISING, value.split("\n", len(ADVERTISING) - 1), strict=False)),
    ]
    if choose is not None:
        sets = [sets[choose % len(sets)]]
    for headers in sets:
        quota = parse_advertised(headers, now=now)
        if not _advertised_ok(quota):
            raise AssertionError(f"parse_advertised({headers!r}) broke the contract: {quota!r}")


def main(argv: list[str]) -> None:
    import atheris  # optional: only the fuzzer itself needs it

    # Coverage feedback from the parsers and the stdlib date parser they call; not
    # instrument_all(), which spends ~30 s instrumenting aiohttp for nothing.
    for module in (_headers, email.utils, email._parseaddr):
        for obj in vars(module).values():
            if isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__:
                atheris.instrument_func(obj)
    atheris.Setup(argv, atheris.instrument_func(check))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
