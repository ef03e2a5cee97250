"""Storage URIs: checked once, never echoed with their credentials."""

from __future__ import annotations

import pytest

from resilient import CircuitBreaker, RateLimitBackoff, StorageError, Throttle, sage
from resilient.storage import SHARED_SCHEMES, check, check_on_storage_error, redact

POLICIES = [
    lambda **kw: Throttle(1.0, quotas="5/second", **kw),
    lambda **kw: RateLimitBackoff(**kw),
    lambda **kw: CircuitBreaker(**kw),
]


@pytest.mark.parametrize("scheme", SHARED_SCHEMES)
def test_every_shared_scheme_is_accepted(scheme):
    assert check("Throttle", f"{scheme}://localhost:6379/0") == f"{scheme}://localhost:6379/0"


@pytest.mark.parametrize(
    "uri", ["mongodb://admin:hunter2@db:27017", "memory", None, 6379, "hunter2-no-scheme"]
)
@pytest.mark.parametrize("make", POLICIES, ids=["throttle", "pause", "breaker"])
def test_an_unsupported_storage_names_the_argument_and_hides_the_value(make, uri):
    with pytest.raises(ValueError, match="storage") as caught:
        make(storage=uri)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("value", ["ignore", None, True, "RAISE"])
@pytest.mark.parametrize("make", POLICIES, ids=["throttle", "pause", "breaker"])
def test_on_storage_error_must_be_raise_or_allow(make, value):
    with pytest.raises(ValueError, match="on_storage_error"):
        make(storage="redis://localhost:6379/0", on_storage_error=value)


def test_on_storage_error_accepts_both_spellings():
    assert check_on_storage_error("X", "raise") == "raise"
    assert check_on_storage_error("X", "allow") == "allow"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://cache:6379/0"),
        ("rediss://user:hunter2@cache.example:6380/2", "rediss://cache.example:6380/2"),
        ("redis://cache:6379/0?password=hunter2", "redis://cache:6379/0"),
        ("redis+unix://:hunter2@/var/run/redis.sock?db=0", "redis+unix:///var/run/redis.sock"),
        ("redis://[::1:6379", "redis://?"),
        ("memory://", "memory://"),
    ],
)
def test_redact_keeps_only_scheme_host_port_and_db(uri, shown):
    assert redact(uri) == shown


@pytest.mark.parametrize("make", POLICIES, ids=["throttle", "pause", "breaker"])
def test_reprs_show_the_redacted_storage(make):
    policy = make(storage="rediss://user:hunter2@cache:6380/1")
    assert "hunter2" not in repr(policy)
    assert "rediss://cache:6380/1" in repr(policy)


def test_storage_error_message_names_the_storage_and_pickles():
    import pickle

    error = StorageError("redis://cache:6379/0", "ConnectionError")
    assert str(error) == "storage redis://cache:6379/0 failed (ConnectionError)"
    again = pickle.loads(pickle.dumps(error))
    assert (again.storage, again.reason) == (error.storage, error.reason)


def test_the_sage_profile_passes_a_shared_storage_to_every_stateful_policy():
    policies = sage.policies(storage="redis://:hunter2@cache:6379/0")
    shared = [p for p in policies if "storage=" in repr(p)]
    assert len(shared) == 3
    assert all("redis://cache:6379/0" in repr(p) and "hunter2" not in repr(p) for p in shared)
