"""Sage error bodies and typed exceptions.

Sage answers an error with a JSON list (sometimes a single object) of
``{"$severity", "$dataCode", "$message", "$source"}``. :func:`parse_errors`
turns any body into ``list[ErrorDetail]``; :func:`raise_for_error` raises the
:class:`SageAPIError` subclass for the status.

Secrets: the exceptions carry a copy of the request's ``request_info`` whose
``Authorization``, ``Proxy-Authorization`` and ``Cookie`` headers are replaced by
``"[redacted]"`` (aiohttp's ``ClientResponseError.__repr__`` prints the request
headers), and the bearer token sent is masked in the server's messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import ClientResponse, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

__all__ = [
    "REDACTED",
    "AuthorizationError",
    "ErrorDetail",
    "MethodNotAllowed",
    "NotFound",
    "SageAPIError",
    "ServerError",
    "TooManyRequests",
    "UnsupportedMediaType",
    "ValidationError",
    "error_class",
    "parse_errors",
    "raise_for_error",
    "redact_request_info",
]

REDACTED = "[redacted]"
"""What replaces a secret header value or a token in messages."""

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
"""Request headers (lower case) whose values never leave this module unredacted."""

MAX_ERRORS_IN_MESSAGE = 5
"""An exception message lists at most this many error details (all stay in ``.errors``)."""


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One entry of a Sage error body (``$severity``, ``$dataCode``, ``$message``, ``$source``)."""

    severity: str
    data_code: str
    message: str
    source: str

    def __str__(self) -> str:
        text = f"{self.data_code or 'error'}: {self.message}" if self.message else self.data_code
        return f"{text} (source: {self.source})" if self.source else text


def _field(entry: Mapping[str, Any], name: str) -> str:
    value = entry.get(name)
    return "" if value is None else str(value)


def parse_errors(body: bytes | str | object) -> list[ErrorDetail]:
    """Error details of a Sage body: bytes/str (JSON text) or already-parsed JSON.

    A list yields one detail per object in it, a single object yields one detail;
    anything else (empty, not JSON, JSON without objects) yields ``[]``. Missing
    fields are ``""``. Never raises on bad input.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body).decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested beyond the parser
            return []
    entries: Sequence[object]
    if isinstance(body, Mapping):
        entries = [body]
    elif isinstance(body, list):
        entries = body
    else:
        return []
    return [
        ErrorDetail(
            severity=_field(entry, "$severity"),
            data_code=_field(entry, "$dataCode"),
            message=_field(entry, "$message"),
            source=_field(entry, "$source"),
        )
        for entry in entries
        if isinstance(entry, Mapping)
    ]


def redact_request_info(info: RequestInfo) -> RequestInfo:
    """A copy of ``info`` whose secret headers (:data:`SECRET_HEADERS`) read ``[redacted]``."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in info.headers.items():
        headers.add(name, REDACTED if name.lower() in SECRET_HEADERS else value)
    return RequestInfo(info.url, info.method, CIMultiDictProxy(headers), info.real_url)


def _secrets_of(info: RequestInfo) -> list[str]:
    """Secret values sent with the request, and the bare token of ``Bearer <token>``."""
    found: list[str] = []
    for name, value in info.headers.items():
        if name.lower() in SECRET_HEADERS and value:
            found.append(value)
            scheme, _, token = value.partition(" ")
            if token.strip() and scheme:
                found.append(token.strip())
    return sorted(found, key=len, reverse=True)


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:  # masking a 1-3 character "token" would shred the message
            text = text.replace(secret, REDACTED)
    return text


def _mask_detail(detail: ErrorDetail, secrets: Sequence[str]) -> ErrorDetail:
    if not secrets:
        return detail
    return ErrorDetail(
        detail.severity,
        _mask(detail.data_code, secrets),
        _mask(detail.message, secrets),
        _mask(detail.source, secrets),
    )


class SageAPIError(aiohttp.ClientResponseError):
    """A Sage error response. ``errors`` holds the parsed :class:`ErrorDetail` list.

    Its ``request_info`` is redacted (no ``Authorization`` value); ``str()`` reads
    ``"422, message='RecordInvalid: ... (source: ...)', url='...'"``.
    """

    def __init__(
        self,
        request_info: RequestInfo,
        history: tuple[ClientResponse, ...] = (),
        *,
        status: int | None = None,
        message: str = "",
        headers: MultiMapping[str] | None = None,
        errors: Sequence[ErrorDetail] = (),
    ) -> None:
        secrets = _secrets_of(request_info)
        super().__init__(
            redact_request_info(request_info),
            history,
            status=status,
            message=_mask(message, secrets),
            headers=headers,
        )
        self.errors: list[ErrorDetail] = [_mask_detail(e, secrets) for e in errors]

    @property
    def data_codes(self) -> list[str]:
        """The ``$dataCode`` of every error detail, in order."""
        return [e.data_code for e in self.errors]


class AuthorizationError(SageAPIError):
    """401: the token expired, was revoked or is invalid, or the user lacks access."""


class NotFound(SageAPIError):
    """404: the path (or the record) does not exist."""


class MethodNotAllowed(SageAPIError):
    """405: the HTTP verb is not available on this path."""


class UnsupportedMediaType(SageAPIError):
    """415: the body was not ``application/json``."""


class ValidationError(SageAPIError):
    """422: invalid data; the request can not be completed as sent."""


class TooManyRequests(SageAPIError):
    """429: throttled; the server may ask to wait up to 24 hours."""


class ServerError(SageAPIError):
    """5xx: a bug on Sage's side (500) or a server that could not be reached (503)."""


_BY_STATUS: dict[int, type[SageAPIError]] = {
    401: AuthorizationError,
    404: NotFound,
    405: MethodNotAllowed,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: TooManyRequests,
}


def error_class(status: int) -> type[SageAPIError]:
    """The exception type for ``status`` >= 400: 5xx ServerError, unlisted 4xx SageAPIError."""
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, SageAPIError)


def _message(status: int, reason: str | None, errors: Sequence[ErrorDetail]) -> str:
    if not errors:
        try:
            return reason or HTTPStatus(status).phrase
        except ValueError:
            return reason or ""
    shown = "; ".join(str(e) for e in errors[:MAX_ERRORS_IN_MESSAGE])
    more = len(errors) - MAX_ERRORS_IN_MESSAGE
    return f"{shown}; and {more} more" if more > 0 else shown


async def raise_for_error(response: ClientResponse) -> None:
    """Return ``None`` for a status below 400; else raise the typed :class:`SageAPIError`.

    Reads the body (aiohttp caches it, so the response stays readable) to fill
    ``errors``; an unreadable body gives ``errors == []``.
    """
    status = response.status
    if status < 400:
        return None
    try:
        body = await response.read()
    except aiohttp.ClientError:
        body = b""
    errors = parse_errors(body)
    raise error_class(status)(
        response.request_info,
        response.history,
        status=status,
        message=_message(status, response.reason, errors),
        headers=response.headers,
        errors=errors,
    )
