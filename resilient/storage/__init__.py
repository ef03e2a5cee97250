"""Where per-key state lives: ``memory://`` (this process) or Redis (shared).

A policy's ``storage`` URI is checked once, in its constructor, by :func:`check`.
``memory://`` keeps state in the process. A Redis URI (``redis://host:port/db``,
``rediss://`` for TLS, ``redis+unix://``, and ``limits``' ``redis+sentinel://`` and
``redis+cluster://``) shares it between processes and hosts: quota windows through
``limits``' Redis storage, the 429 pause and the breaker in the same Redis
(:mod:`resilient.storage._redis`).

A URI may carry a password, so it is never echoed whole: messages, reprs and
errors show :func:`redact`'s form (scheme, host, port and database only).

``on_storage_error``: ``"raise"`` (default) fails a request whose shared state
cannot be read or written in bounded time with :class:`~resilient.StorageError`;
``"allow"`` lets it proceed on this process's own state, with a logged warning.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from .._validate import choice

__all__ = [
    "MEMORY",
    "ON_STORAGE_ERROR",
    "SHARED_SCHEMES",
    "OnStorageError",
    "check",
    "check_on_storage_error",
    "is_shared",
    "redact",
]

MEMORY = "memory://"
SHARED_SCHEMES = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
"""URI schemes of shared storage (all served by Redis through ``redis-py``)."""

OnStorageError = Literal["raise", "allow"]
ON_STORAGE_ERROR: tuple[OnStorageError, ...] = ("raise", "allow")


def check(owner: str, uri: object) -> str:
    """``uri`` if it names a supported storage, else ValueError naming ``storage``
    (and only the URI's scheme)."""
    if uri == MEMORY:
        return MEMORY
    scheme = uri.split("://", 1)[0] if isinstance(uri, str) and "://" in uri else None
    if scheme not in SHARED_SCHEMES:
        shown = f"a {scheme!r} URI" if scheme else _short(uri)
        accepted = ", ".join([MEMORY] + [f"{s}://..." for s in SHARED_SCHEMES])
        raise ValueError(f"{owner}: storage must be one of {accepted}; got {shown}")
    assert isinstance(uri, str)
    return uri


def check_on_storage_error(owner: str, value: object) -> OnStorageError:
    """``"raise"`` or ``"allow"``, else ValueError naming ``on_storage_error``."""
    return choice(owner, "on_storage_error", value, ON_STORAGE_ERROR)


def is_shared(uri: str) -> bool:
    """A checked URI that is not ``memory://``."""
    return uri != MEMORY


def redact(uri: str) -> str:
    """``redis://user:secret@host:6379/0?password=x`` -> ``redis://host:6379/0``."""
    if uri == MEMORY:
        return uri
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return uri.split("://", 1)[0] + "://?"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _short(value: object) -> str:
    """A value without a scheme, shown only when it cannot be a secret (not a str)."""
    return "a str without a scheme" if isinstance(value, str) else repr(value)[:40]
