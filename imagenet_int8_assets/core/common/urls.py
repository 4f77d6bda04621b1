"""URLs as the product shows them: never with the credentials a user put inside them.

``HF_ENDPOINT=http://user:password@host`` (a Hub behind basic auth) and endpoint URLs of
S3-compatible stores may carry credentials in their user-info part. Every URL the product prints,
logs or records in metadata goes through ``redact_url`` (one URL) or ``redact_urls`` (any text, such
as an exception message from a client library that quotes the URL it called). No Dagster import.
"""

from __future__ import annotations

import re

REDACTED = "***"

# scheme://user[:password]@ : the user name holds no "/", "?", "#" or "@"; the password may hold "/"
# and "+" (AWS secret keys do, unescaped), never "@" or white space. So "http://a:b@c/d@e" redacts
# "a:b" only, and "http://host/x@y" (no user-info) nothing; "http://host:80/x@y" is redacted
# too (a port followed by a path holding "@" reads like a password: shown masked, never leaked).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s:]+(?::[^@\s]*)?)@")


def has_credentials(url: str) -> bool:
    """Whether ``url`` (or any URL in the text) carries user-info (``user[:password]@``)."""
    return _USERINFO.search(url or "") is not None


def redact_urls(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***``: ``http://***@host/...``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text or "")


def redact_url(url: str) -> str:
    """One URL without its credentials (``redact_urls`` on a single URL; other URLs unchanged)."""
    return redact_urls(url)
