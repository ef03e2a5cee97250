"""mkdocs hook: docstrings use reST roles (:class:`X`, :func:`~a.b`); show their targets as
code, as Sphinx would, without the role (mkdocstrings renders the role's text as is)."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):(<code>)~?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
