"""sage.parse_errors, sage.raise_for_error and the typed exception hierarchy."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from resilient import sage

EXPIRED = {
    "$severity": "error",
    "$dataCode": "AccessTokenExpiredError",
    "$message": "Your Access token has expired.",
    "$source": "Authorization",
}
INVALID = [
    {
        "$severity": "error",
        "$dataCode": "RecordInvalid",
        "$message": "can't be blank",
        "$source": "contact_name",
    },
    {
        "$severity": "error",
        "$dataCode": "RecordInvalid",
        "$message": "is not a date",
        "$source": "date",
    },
]


def json_reply(status: int, body: object):
    async def reply(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    return reply


def test_parse_errors_reads_a_list_in_order():
    details = sage.parse_errors(json.dumps(INVALID))
    assert [d.source for d in details] == ["contact_name", "date"]
    first = sage.ErrorDetail("error", "RecordInvalid", "can't be blank", "contact_name")
    assert details[0] == first


def test_parse_errors_reads_a_single_object():
    assert sage.parse_errors(json.dumps(EXPIRED).encode()) == [
        sage.ErrorDetail(
            "error", "AccessTokenExpiredError", "Your Access token has expired.", "Authorization"
        )
    ]


def test_parse_errors_accepts_already_parsed_json():
    assert sage.parse_errors(INVALID) == sage.parse_errors(json.dumps(INVALID))


@pytest.mark.parametrize(
    "body", [b"", "<html>Bad Gateway</html>", "null", "42", '"text"', b"\xff\xfe", "[1, 2]", None]
)
def test_parse_errors_returns_empty_for_bodies_without_error_objects(body):
    assert sage.parse_errors(body) == []


def test_parse_errors_fills_missing_fields_with_empty_strings():
    assert sage.parse_errors({"$dataCode": "PathNotFound"}) == [
        sage.ErrorDetail("", "PathNotFound", "", "")
    ]


def test_parse_errors_survives_deeply_nested_json():
    assert sage.parse_errors("[" * 100_000 + "]" * 100_000) == []


@given(st.binary(max_size=200))
def test_parse_errors_never_raises_on_arbitrary_bytes(body):
    assert isinstance(sage.parse_errors(body), list)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_parse_errors_never_raises_on_arbitrary_json(value):
    assert all(isinstance(d, sage.ErrorDetail) for d in sage.parse_errors(value))


def test_error_detail_is_frozen():
    detail = sage.ErrorDetail("error", "X", "m", "s")
    with pytest.raises(AttributeError):
        detail.message = "changed"  # type: ignore[misc]


async def test_raise_for_error_returns_none_below_400(server, client):
    server.script("/contacts", 201)
    async with client.get(server.url + "/contacts") as resp:
        assert await sage.raise_for_error(resp) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, sage.AuthorizationError),
        (404, sage.NotFound),
        (405, sage.MethodNotAllowed),
        (415, sage.UnsupportedMediaType),
        (422, sage.ValidationError),
        (429, sage.TooManyRequests),
        (500, sage.ServerError),
        (503, sage.ServerError),
        (400, sage.SageAPIError),
        (409, sage.SageAPIError),
    ],
)
async def test_raise_for_error_raises_the_type_for_the_status(server, client, status, kind):
    server.script("/x", json_reply(status, [EXPIRED]))
    async with client.get(server.url + "/x") as resp:
        with pytest.raises(kind) as caught:
            await sage.raise_for_error(resp)
    assert type(caught.value) is kind
    assert isinstance(caught.value, aiohttp.ClientResponseError)
    assert caught.value.status == status


async def test_raised_error_carries_details_and_shows_them_in_its_message(server, client):
    server.script("/sales_invoices", json_reply(422, INVALID))
    async with client.post(server.url + "/sales_invoices", json={}) as resp:
        with pytest.raises(sage.ValidationError) as caught:
            await sage.raise_for_error(resp)
    error = caught.value
    assert error.errors == sage.parse_errors(INVALID)
    assert error.data_codes == ["RecordInvalid", "RecordInvalid"]
    for text in ("RecordInvalid", "can't be blank", "contact_name", "is not a date"):
        assert text in str(error)


async def test_response_stays_readable_after_raise_for_error(server, client):
    server.script("/x", json_reply(404, {"$dataCode": "PathNotFound"}))
    async with client.get(server.url + "/x") as resp:
        with pytest.raises(sage.NotFound):
            await sage.raise_for_error(resp)
        assert (await resp.json())["$dataCode"] == "PathNotFound"


async def test_error_without_a_json_body_has_no_details_and_names_the_status(server, client):
    server.script("/x", 503)
    async with client.get(server.url + "/x") as resp:
        with pytest.raises(sage.ServerError) as caught:
            await sage.raise_for_error(resp)
    assert caught.value.errors == []
    assert "Service Unavailable" in str(caught.value)


async def test_error_keeps_no_authorization_value_in_str_repr_or_request_info(server, client):
    token = "tok-ERRORS-8d1c7"
    server.script(
        "/x",
        json_reply(
            401, {"$dataCode": "AuthorizationFailure", "$message": f"token {token} revoked"}
        ),
    )
    headers = {"Authorization": f"Bearer {token}", "X-Business": "biz-1"}
    async with client.get(server.url + "/x", headers=headers) as resp:
        with pytest.raises(sage.AuthorizationError) as caught:
            await sage.raise_for_error(resp)
    error = caught.value
    for text in (str(error), repr(error), repr(error.args), repr(error.errors)):
        assert token not in text
    assert error.request_info.headers["Authorization"] == sage.REDACTED
    assert error.request_info.headers["X-Business"] == "biz-1"
