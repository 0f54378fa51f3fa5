"""Secrets out of anything printed: Redis URLs and messages with their passwords replaced by ***.

Kept apart from `connection` so that code which only names a Redis (the local-Redis helper, `--help`)
does not import redis-py.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

DEFAULT_URL = "redis://127.0.0.1:6379"
MASK = "***"
_SECRET_QUERY = re.compile(r"([?&](?:password|pass|pwd|secret|token)=)[^&#]*", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")


def redact_url(url: str | None) -> str:
    """`url` with its password (userinfo or query parameter) replaced by ***; safe to print or log."""
    if not url:
        return str(url)
    return _SECRET_QUERY.sub(lambda m: m[1] + MASK, redact_text(url))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with URL passwords (scheme://user:pw@) and each of `secrets` replaced by ***."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for s in secrets:
        if s:
            out = out.replace(s, MASK)
    return out


def _password(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    pw = parts.password
    for k, v in parse_qsl(parts.query):
        if k.lower() == "password":
            pw = v
    return pw
