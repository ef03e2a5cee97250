"""The tests' ``nginx``: :class:`resilient.testing.NginxServer`, or a skip.

``make test`` and ``.ci/run`` (as root on Debian) install Debian's ``nginx``. Without it,
nginx tests skip locally and fail under ``CI=true``: CI never passes by skipping them.
"""

from __future__ import annotations

from required import missing

from resilient.testing import NginxServer, find_nginx

__all__ = ["new_nginx_server"]


def new_nginx_server(http_config: str) -> NginxServer:
    """A stopped server with ``http_config``; skip (fail under CI=true) without nginx."""
    binary = find_nginx()
    if binary is None:
        missing("nginx not found (Debian: apt-get install nginx)")
    return NginxServer(binary, http_config)
